"""Tier 2: converting and publishing models to S3 (moto's server), and auto-publish on a miss."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile

import pytest
import zstandard

from schemas import ConvertRequest
from tests.fixtures.ldm import write_checkpoint
from tests.helpers import BUCKET, Loopback, generate, hub_cache
from worker.engine import Engine
from worker.errors import ModelSourceError
from worker.jobs import JobRunner


def convert(settings, source: dict, dest: str, events: list | None = None, **options):
    request = ConvertRequest.model_validate(
        {"task": "convert", "model": source, "convert": {"dest_url": dest, "precision": "fp32", **options}}
    )
    return Engine(settings).convert(request, (events if events is not None else []).append, lambda: False)


def members(s3, key: str) -> dict[str, tarfile.TarInfo]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if key.endswith(".zst"):
        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_convert_a_local_model_and_serve_from_the_archive(settings, s3, tiny_dir, tmp_path):
    (tiny_dir / "unet" / "stray.bin").write_bytes(b"not a weight we publish")  # a source's leftovers
    events: list = []
    try:
        result = convert(settings, {"id": str(tiny_dir)}, "s3://models/published/tiny.tar.zst", events)
    finally:
        (tiny_dir / "unet" / "stray.bin").unlink()
    out = result.convert
    assert out.url == "s3://models/published/tiny.tar.zst" and out.compression == "zstd"
    body = s3.get_object(Bucket=BUCKET, Key="published/tiny.tar.zst")["Body"].read()
    assert out.sha256 == hashlib.sha256(body).hexdigest() and out.size_bytes == len(body)
    head = s3.head_object(Bucket=BUCKET, Key="published/tiny.tar.zst")
    assert head["Metadata"]["sha256"] == out.sha256
    sidecar = s3.get_object(Bucket=BUCKET, Key="published/tiny.tar.zst.sha256")["Body"].read().decode()
    assert sidecar.split()[0] == out.sha256

    names = members(s3, "published/tiny.tar.zst")
    assert "model_index.json" in names
    weights = [n for n, m in names.items() if m.isfile() and not n.endswith((".json", ".txt"))]
    assert weights and all(n.endswith(".safetensors") for n in weights), weights
    assert {m.mtime for m in names.values()} == {0}  # deterministic
    stages = [e.stage for e in events]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == ["load", "save", "pack", "upload"]
    assert [e for e in events if e.stage == "upload"][-1].step == out.size_bytes

    fresh = settings.model_copy(update={"models_dir": tmp_path / "other-worker"})
    served = generate(fresh, {"url": out.url})
    direct = generate(fresh, {"id": str(tiny_dir)})
    assert served.model.source == "url"
    assert served.images[0].base64 == direct.images[0].base64


def test_same_model_same_archive_bytes(settings, s3, tiny_dir):
    first = convert(settings, {"id": str(tiny_dir)}, "s3://models/det/a.tar", compression="none").convert
    second = convert(settings, {"id": str(tiny_dir)}, "s3://models/det/b.tar", compression="none").convert
    assert first.sha256 == second.sha256


def test_convert_a_single_file_checkpoint(settings, s3, tmp_path):
    from builder import tiny_model

    sd_dir = tiny_model.ensure(tmp_path / "sd-layout", sd_layout=True)
    s3.put_object(Bucket=BUCKET, Key="src/tiny.safetensors",
                  Body=write_checkpoint(sd_dir, tmp_path / "tiny.safetensors").read_bytes())
    result = convert(settings, {"id": str(sd_dir), "checkpoint_url": "s3://models/src/tiny.safetensors"},
                     "s3:///models/from-ckpt/tiny.tar.zst")
    assert result.model.source == "checkpoint"
    names = members(s3, "from-ckpt/tiny.tar.zst")
    assert "unet/diffusion_pytorch_model.safetensors" in names
    assert not [n for n in names if n.endswith((".ckpt", ".bin"))]
    served = generate(settings.model_copy(update={"models_dir": tmp_path / "w2"}), {"url": result.convert.url})
    direct = generate(settings, {"id": str(sd_dir)})
    assert served.images[0].base64 == direct.images[0].base64


def test_bare_s3_destination_uses_the_conventional_name(settings, s3, tiny_dir, tmp_path):
    hub = hub_cache(tmp_path / "hub", "acme/tiny", tiny_dir, {"main": "e" * 40})
    with_hub = settings.model_copy(update={"hf_hub_cache": hub})
    assert convert(with_hub, {"id": "acme/tiny"}, "s3://").convert.url == "s3://models/models--acme--tiny--fp32.tar.zst"
    plain = convert(with_hub, {"id": "acme/tiny"}, "s3:///models/plain/", compression="none").convert
    assert plain.url == "s3://models/plain/models--acme--tiny--fp32.tar"
    with pytest.raises(ModelSourceError, match=r"^convert\.dest_url: a bare s3:// URL needs model\.id as a hub id"):
        convert(settings, {"id": str(tiny_dir)}, "s3://")


def test_auto_publish_on_a_miss_then_the_next_worker_fetches_it(settings, s3, tiny_dir, tmp_path):
    hub = hub_cache(tmp_path / "hub", "acme/autopub", tiny_dir, {"main": "f" * 40})
    first_worker = settings.model_copy(update={"hf_hub_cache": hub})
    key = "models--acme--autopub--fp32.tar.zst"
    first = generate(first_worker, {"id": "acme/autopub", "url": "s3://"})
    assert first.model.source == "cache"  # the weights came from the hub cache, and were published
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert s3.head_object(Bucket=BUCKET, Key=key)["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()

    # A new worker with no hub cache and an empty volume: it can only have come from S3.
    second_worker = settings.model_copy(update={"models_dir": tmp_path / "fresh", "hf_hub_cache": tmp_path / "none"})
    second = generate(second_worker, {"id": "acme/autopub", "url": "s3://"})
    assert second.model.source == "url"
    assert second.images[0].base64 == first.images[0].base64


def test_auto_publish_from_a_single_file_checkpoint(settings, s3, tmp_path):
    from builder import tiny_model

    sd_dir = tiny_model.ensure(tmp_path / "sd-layout", sd_layout=True)
    s3.put_object(Bucket=BUCKET, Key="src/auto.safetensors",
                  Body=write_checkpoint(sd_dir, tmp_path / "auto.safetensors").read_bytes())
    model = {"id": str(sd_dir), "checkpoint_url": "s3://models/src/auto.safetensors",
             "url": "s3://models/auto/from-ckpt.tar.zst"}
    first = generate(settings, model)
    assert first.model.source == "checkpoint"
    assert "model_index.json" in members(s3, "auto/from-ckpt.tar.zst")
    later = generate(settings.model_copy(update={"models_dir": tmp_path / "fresh"}), model)
    assert later.model.source == "url" and later.images[0].base64 == first.images[0].base64


def test_a_cancelled_convert_stops_before_its_next_stage(settings, s3, tiny_dir):
    from worker.errors import JobCancelled

    events = []
    request = ConvertRequest.model_validate({"task": "convert", "model": {"id": str(tiny_dir)},
                                             "convert": {"dest_url": f"s3://{BUCKET}/cancelled.tar.zst"}})
    loaded = lambda: any(e.stage == "load" and e.step == 1 for e in events)  # noqa: E731  RunPod cancels now
    with pytest.raises(JobCancelled, match="^job: cancelled before save$"):
        Engine(settings).convert(request, events.append, loaded)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="cancelled")


def test_a_missing_bucket_is_refused_before_any_work(settings, s3, tiny_dir):
    events = []
    anywhere = settings.model_copy(update={"write_destinations": "s3://nowhere/"})
    with pytest.raises(ModelSourceError, match=r"^convert\.dest_url: bucket 'nowhere' does not exist"):
        convert(anywhere, {"id": str(tiny_dir)}, "s3://nowhere/x.tar.zst", events)
    assert events == []


def test_a_miss_with_nothing_to_build_from_is_an_error(settings, s3):
    with pytest.raises(ModelSourceError, match=r"^model\.url: s3://models/absent\.tar\.zst does not exist"):
        generate(settings, {"url": "s3://models/absent.tar.zst"})


class DenyingS3(Loopback):
    """A real HTTP endpoint speaking S3's multipart protocol that refuses every part (403),
    recording what the client asks, to see that a failed upload is aborted."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler

        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                calls.append(("POST", self.path))
                self._reply(200, b'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult>'
                                 b"<Bucket>models</Bucket><Key>k</Key><UploadId>upload-1</UploadId>"
                                 b"</InitiateMultipartUploadResult>")

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                calls.append(("PUT", self.path))
                self._reply(403, b"<Error><Code>AccessDenied</Code><Message>denied</Message></Error>")

            def do_DELETE(self):
                calls.append(("DELETE", self.path))
                self._reply(204)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_a_failed_upload_is_aborted_and_says_why(settings, tiny_dir, tmp_path):
    from worker.sources.publish import pack, upload
    from worker.sources.storage import parse_location

    archive = tmp_path / "tiny.tar"
    sha256, size = pack(tiny_dir, archive, "none")
    assert size > 5 * 2**20  # more than one part: a multipart upload
    server = DenyingS3()
    denying = settings.model_copy(update={"aws_s3_endpoint_url": server.url})
    location = parse_location("s3://models/broken/tiny.tar", "convert.dest_url", denying, None, "fp32")
    with pytest.raises(ModelSourceError, match=r"^convert\.dest_url: access to s3://models/broken/tiny\.tar denied"):
        upload(archive, location, sha256, denying, "convert.dest_url", lambda event: None)
    server.close()
    methods = [method for method, _ in server.calls]
    assert methods[0] == "POST" and "PUT" in methods
    assert ("DELETE", "/models/broken/tiny.tar?uploadId=upload-1") in server.calls  # aborted: no orphan parts
    assert "test-secret-key" not in str(server.calls)


def test_convert_job_through_the_handler_streams_each_stage(settings, s3, tiny_dir):
    runner = JobRunner(settings, sdk_config={})
    job = {"id": "c1", "input": {"task": "convert", "stream": True, "model": {"id": str(tiny_dir)},
                                 "convert": {"dest_url": "s3://models/job/tiny.tar.zst"}}}

    async def go():
        return [item async for item in runner.stream(job)]

    *progress, result = asyncio.run(go())
    assert result["type"] == "result" and result["task"] == "convert"
    assert result["convert"]["url"] == "s3://models/job/tiny.tar.zst" and result["convert"]["precision"] == "fp16"
    assert {"save", "pack", "upload"} <= {p["stage"] for p in progress}
    assert {"pack", "upload", "total_ms"} <= set(result["timings"])


def test_command_line_publishes_and_reports(settings, s3, tiny_dir, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT, worker_env

    env = worker_env(tmp_path / "cli-models", AWS_S3_ENDPOINT_URL=settings.aws_s3_endpoint_url,
                     AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test-secret-key", AWS_DEFAULT_REGION="us-east-1",
                     AWS_S3_DEFAULT_BUCKET=BUCKET)
    done = subprocess.run([sys.executable, "-m", "worker.convert", str(tiny_dir), "s3://models/cli/tiny.tar.zst",
                           "--precision", "fp32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    body = s3.get_object(Bucket=BUCKET, Key="cli/tiny.tar.zst")["Body"].read()
    assert f"sha256 {hashlib.sha256(body).hexdigest()}" in done.stdout
    assert "published s3://models/cli/tiny.tar.zst" in done.stdout
    assert "upload" in done.stderr  # the progress bars

    bad = subprocess.run([sys.executable, "-m", "worker.convert", str(tiny_dir), "https://example.com/x.tar"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1
    assert "error: convert.dest_url: must be an s3:// URL" in bad.stderr and "Traceback" not in bad.stderr

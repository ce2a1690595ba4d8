"""What a request may write on the operator's storage (moto's S3 over HTTP): only where
WRITE_DESTINATIONS says, never over an object, never a conventional name it does not hold."""

from __future__ import annotations

import re

import pytest

from schemas import ConvertRequest, TrainRequest
from tests.helpers import BUCKET, generate, hub_cache, png_b64, stream
from worker.engine import Engine
from worker.errors import UserInputError
from worker.settings import Settings
from worker.sources.destinations import ObjectExists

PRODUCTION = "models--acme--tiny--fp32.tar.zst"  # the archive the endpoint's workers cold-start from


def convert(settings, source: dict, dest: str, events: list | None = None, trusted: bool = False, **options):
    request = ConvertRequest.model_validate(
        {"task": "convert", "model": source, "convert": {"dest_url": dest, "precision": "fp32", **options}})
    return Engine(settings).convert(request, (events if events is not None else []).append, lambda: False,
                                    trusted=trusted)


def train(settings, dest: str, events: list):
    request = TrainRequest.model_validate({"task": "train", "train": {
        "instance_prompt": "sks", "instance_images": [png_b64()], "resolution": 64, "max_train_steps": 1,
        "dest_url": dest}})
    return Engine(settings).train(request, events.append, lambda: False, "job-1")


def body(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture
def production(s3):
    """The endpoint's archive and its digest, as the operator published them."""
    s3.put_object(Bucket=BUCKET, Key=PRODUCTION, Body=b"the operator's weights")
    s3.put_object(Bucket=BUCKET, Key=PRODUCTION + ".sha256", Body=b"0" * 64 + b"  " + PRODUCTION.encode())
    return s3


# --- 1. Never over an object ---


def test_convert_never_overwrites_an_object_and_refuses_before_any_work(settings, s3, tiny_dir):
    s3.put_object(Bucket=BUCKET, Key="prod/model.tar.zst", Body=b"in service")
    events = []
    with pytest.raises(ObjectExists, match=r"^convert\.dest_url: s3://models/prod/model\.tar\.zst already exists, "
                                           r"and requests never overwrite"):
        convert(settings, {"id": str(tiny_dir)}, "s3://models/prod/model.tar.zst", events)
    assert events == [] and body(s3, "prod/model.tar.zst") == b"in service"


def test_nor_over_a_digest_that_would_vouch_for_it(settings, s3, tiny_dir):
    s3.put_object(Bucket=BUCKET, Key="next/model.tar.zst.sha256", Body=b"a" * 64)
    with pytest.raises(ObjectExists, match=r"^convert\.dest_url: s3://models/next/model\.tar\.zst\.sha256 already"):
        convert(settings, {"id": str(tiny_dir)}, "s3://models/next/model.tar.zst")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="next/model.tar.zst/")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="next/")["Contents"]] == [
        "next/model.tar.zst.sha256"]


def test_a_conditional_upload_keeps_what_got_there_first(settings, s3, tiny_dir, tmp_path):
    from worker.sources.publish import pack, upload
    from worker.sources.storage import parse_location

    archive = tmp_path / "tiny.tar"
    sha256, size = pack(tiny_dir, archive, "none")
    assert size > 5 * 2**20  # a multipart upload: its object is made by CompleteMultipartUpload
    location = parse_location("s3://models/race/tiny.tar", "convert.dest_url", settings, None, "fp32")
    taken = []

    def racer(event):  # the key was free when checked; the first part is on its way: another writer wins
        if event.stage == "upload" and not taken:
            taken.append(s3.put_object(Bucket=BUCKET, Key="race/tiny.tar", Body=b"first"))

    with pytest.raises(ObjectExists, match=r"^convert\.dest_url: s3://models/race/tiny\.tar already exists"):
        upload(archive, location, sha256, settings, "convert.dest_url", racer)
    assert taken and body(s3, "race/tiny.tar") == b"first"
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")  # the parts were aborted
    small = tmp_path / "small.bin"
    small.write_bytes(b"one part")
    s3.put_object(Bucket=BUCKET, Key="race/small.bin", Body=b"first")
    with pytest.raises(ObjectExists):  # a single PutObject: conditional too (the check is skipped by the race)
        upload(small, parse_location("s3://models/race/small.bin", "f", settings, None, ""), "0" * 64, settings,
               "f", lambda event: None)
    assert body(s3, "race/small.bin") == b"first"


def test_train_never_overwrites(settings, s3):
    s3.put_object(Bucket=BUCKET, Key="loras/mine.safetensors", Body=b"someone's lora")
    events = []
    with pytest.raises(ObjectExists, match=r"^train\.dest_url: s3://models/loras/mine\.safetensors already exists"):
        train(settings, "s3://models/loras/mine.safetensors", events)
    assert events == [] and body(s3, "loras/mine.safetensors") == b"someone's lora"


# --- 2. Only where the operator said ---


@pytest.mark.parametrize("dest, expected", [
    ("s3://other-bucket/x.tar.zst", "s3://other-bucket/x.tar.zst is not where this endpoint lets requests write "
                                    "(WRITE_DESTINATIONS: s3://models/requests/)"),
    ("s3://models/x.tar.zst", "s3://models/x.tar.zst is not where"),
    # a folder, not a prefix:
    ("s3://models/requests-evil/x.tar.zst", "s3://models/requests-evil/x.tar.zst is not where"),
    ("s3://models/requests/../x.tar.zst", "'requests/../x.tar.zst': a key has no empty, '.' or '..' parts"),
    ("s3://models/requests//x.tar.zst", "'requests//x.tar.zst': a key has no empty"),
    ("s3://models/requests/./x.tar.zst", "'requests/./x.tar.zst': a key has no empty"),
    ("s3://models/requests/x.tar.zst.sha256", "names a .sha256 digest: the worker writes those itself"),
])
def test_convert_writes_only_under_write_destinations(settings, s3, tiny_dir, dest, expected):
    limited = settings.model_copy(update={"write_destinations": "s3://models/requests/"})
    events = []
    with pytest.raises(UserInputError, match="^convert\\.dest_url: " + re.escape(expected)):
        convert(limited, {"id": str(tiny_dir)}, dest, events)
    assert events == []
    assert convert(limited, {"id": str(tiny_dir)}, "s3://models/requests/ok.tar").convert.url == \
        "s3://models/requests/ok.tar"


def test_by_default_only_the_default_bucket_and_none_means_nowhere(settings, s3, tiny_dir):
    assert settings.write_places == [(BUCKET, "")]
    assert Settings(aws_s3_default_bucket=None).write_places == []
    nowhere = settings.model_copy(update={"write_destinations": "none"})
    with pytest.raises(UserInputError, match=r"^train\.dest_url: .* \(WRITE_DESTINATIONS: none\)"):
        train(nowhere, "s3://models/x.safetensors", [])
    with pytest.raises(ValueError, match=r"WRITE_DESTINATIONS: 'https://x/y' is not an s3://bucket/prefix/ place"):
        Settings(write_destinations="s3://a/ https://x/y")


def test_train_writes_only_under_write_destinations(settings, s3):
    limited = settings.model_copy(update={"write_destinations": "s3://models/loras/"})
    with pytest.raises(UserInputError, match=r"^train\.dest_url: s3://models/elsewhere\.safetensors is not where"):
        train(limited, "s3://models/elsewhere.safetensors", [])


# --- 3. Conventional names hold what they name ---


def test_a_request_cannot_publish_as_a_hub_models_archive(settings, s3, tiny_dir, tmp_path):
    """A model of the caller's (a local directory, a checkpoint, a pull request's revision)
    under the name the endpoint's workers fetch acme/tiny by: the next cold start would run it."""
    hub = settings.model_copy(update={"hf_hub_cache": hub_cache(tmp_path / "hub", "acme/tiny", tiny_dir,
                                                                 {"main": "e" * 40, "refs/pr/1": "f" * 40})})
    refused = r"^convert\.dest_url: models--acme--tiny--fp32\.tar\.zst is the conventional name of a hub model"
    with pytest.raises(UserInputError, match=refused):
        convert(hub, {"id": str(tiny_dir)}, f"s3://models/{PRODUCTION}")
    with pytest.raises(UserInputError, match=refused):
        convert(hub, {"id": "acme/tiny", "revision": "refs/pr/1"}, "s3://")
    with pytest.raises(UserInputError, match=r"^convert\.dest_url: models--acme--tiny--fp16\.tar\.zst is the conv"):
        convert(hub, {"id": "acme/tiny"}, "s3://models/models--acme--tiny--fp16.tar.zst")  # fp32 weights
    with pytest.raises(UserInputError, match=r"^train\.dest_url: models--acme--tiny--fp32\.tar\.zst is the conv"):
        train(hub, f"s3://models/{PRODUCTION}", [])
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)
    # From the hub repo itself, at its default revision: its own name.
    assert convert(hub, {"id": "acme/tiny"}, "s3://").convert.url == f"s3://models/{PRODUCTION}"


def test_the_production_archive_cannot_be_replaced(settings, production, tiny_dir, tmp_path):
    hub = settings.model_copy(update={"hf_hub_cache": hub_cache(tmp_path / "hub", "acme/tiny", tiny_dir,
                                                                 {"main": "e" * 40})})
    with pytest.raises(ObjectExists, match=r"^convert\.dest_url: s3://models/models--acme--tiny--fp32\.tar\.zst al"):
        convert(hub, {"id": "acme/tiny"}, "s3://")
    assert body(production, PRODUCTION) == b"the operator's weights"


def test_the_operators_own_model_url_is_never_a_requests_destination(settings, s3, tiny_dir):
    operator = settings.model_copy(update={"model_url": "s3://models/prod/next.tar.zst"})  # not published yet
    for dest in ("s3://models/prod/next.tar.zst", "s3:///models/prod/next.tar.zst"):
        with pytest.raises(UserInputError, match=r"^convert\.dest_url: s3://models/prod/next\.tar\.zst is where this "
                                                 r"endpoint's own model comes from"):
            convert(operator, {"id": str(tiny_dir)}, dest)


def test_a_request_revision_cannot_stand_in_for_the_default_archive(settings, s3):
    """MODEL_URL holds one revision: a request's own (a pull request's, say) is neither fetched
    nor published under it."""
    from worker.errors import ModelSourceError

    operator = settings.model_copy(update={"model_id": "acme/tiny", "model_url": "s3://"})
    with pytest.raises(ModelSourceError, match=r"^model\.revision: this endpoint's default model comes from its "
                                               r"archive \(MODEL_URL\), one revision"):
        generate(operator, {"revision": "refs/pr/1"})
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


# --- 4. Auto-publish and the operator's own conversions ---


def test_auto_publish_goes_only_where_requests_may_write(settings, s3, tmp_path):
    from builder import tiny_model
    from tests.fixtures.ldm import write_checkpoint

    sd_dir = tiny_model.ensure(tmp_path / "sd-layout", sd_layout=True)
    s3.put_object(Bucket=BUCKET, Key="src/auto.safetensors",
                  Body=write_checkpoint(sd_dir, tmp_path / "auto.safetensors").read_bytes())
    limited = settings.model_copy(update={"write_destinations": "s3://models/auto/"})
    model = {"id": str(sd_dir), "checkpoint_url": "s3://models/src/auto.safetensors"}
    with pytest.raises(UserInputError, match=r"^model\.url: s3://models/elsewhere/a\.tar\.zst is not where"):
        generate(limited, model | {"url": "s3://models/elsewhere/a.tar.zst"})
    with pytest.raises(UserInputError, match=r"^model\.url: models--acme--tiny--fp32\.tar\.zst is the conventional"):
        generate(limited, model | {"url": f"s3://models/auto/{PRODUCTION}"})  # a checkpoint under a hub name
    assert generate(limited, model | {"url": "s3://models/auto/a.tar.zst"}).model.source == "checkpoint"
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="auto/")["Contents"]) == [
        "auto/a.tar.zst", "auto/a.tar.zst.sha256"]


def test_the_operators_command_line_writes_anywhere_but_over_an_object(settings, s3, tiny_dir):
    limited = settings.model_copy(update={"write_destinations": "none"})
    out = convert(limited, {"id": str(tiny_dir)}, "s3://models/ops/tiny.tar", trusted=True).convert
    assert out.url == "s3://models/ops/tiny.tar"
    with pytest.raises(ObjectExists, match=r"^convert\.dest_url: s3://models/ops/tiny\.tar already exists"):
        convert(limited, {"id": str(tiny_dir)}, "s3://models/ops/tiny.tar", trusted=True)


# --- 5. Image uploads ---




def run_job(runner, job: dict) -> dict:
    return stream(runner, job)[-1]


def test_uploads_never_overwrite_and_are_refused_before_the_work(fresh_runner, s3):
    s3.put_object(Bucket=BUCKET, Key="renders/again-1.png", Body=b"yesterday's")
    job = {"id": "again", "input": {"prompt": "p", "num_inference_steps": 2, "num_images": 2, "stream": True,
                                    "output": {"upload_url": f"s3://{BUCKET}/renders/"}}}
    answer = run_job(fresh_runner, job)
    assert answer["error"] == ("output.upload_url: s3://models/renders/again-1.png already exists, and requests "
                               "never overwrite: choose another key (or delete it first)")
    assert body(s3, "renders/again-1.png") == b"yesterday's"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/")["Contents"]] == [
        "renders/again-1.png"]


def test_the_callers_own_bucket_takes_images_anywhere_but_never_over_one(fresh_runner, s3, s3_endpoint):
    s3.create_bucket(Bucket="callers")
    s3.put_object(Bucket="callers", Key="theirs/j-0.png", Body=b"kept")
    config = {"accessId": "test", "accessSecret": "caller-secret", "bucketName": "callers", "endpointUrl": s3_endpoint}
    job = {"prompt": "p", "num_inference_steps": 2, "output": {"upload_url": "s3://callers/mine/"}}
    assert run_job(fresh_runner, {"id": "j", "input": job, "s3Config": config})["type"] == "result"
    answer = run_job(fresh_runner, {"id": "j", "input": job | {"output": {"upload_url": "s3://callers/theirs/"}},
                              "s3Config": config})
    assert answer["error"].startswith("output.upload_url: s3://callers/theirs/j-0.png already exists"), answer
    assert s3.get_object(Bucket="callers", Key="theirs/j-0.png")["Body"].read() == b"kept"


def test_presigned_links_are_sigv4(fresh_runner, s3):
    job = {"id": "signed", "input": {"prompt": "p", "num_inference_steps": 2,
                                     "output": {"upload_url": f"s3://{BUCKET}/signed/"}}}
    link = run_job(fresh_runner, job)["images"][0]["presigned_url"]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in link and "AWSAccessKeyId=" not in link, link


"""Publish a diffusers directory as an archive on S3-compatible storage.

Used by ``task: "convert"`` and by auto-publish (an inference request whose ``model.url``
names an S3 archive that does not exist yet, with a source to build it from). The archive is
deterministic (sorted members, zeroed times and owners), so the same weights give the same
bytes and the same sha256. Its members come in the order a cold start loads best from: the
index, configs, tokenizers and scheduler first, then the weights, so a worker knows what each
weight file belongs to before its first byte arrives (worker/sources/streaming.py). The
upload is multipart through boto3's transfer manager, which
aborts the multipart upload if any part fails, so nothing is left behind; the digest goes into
the object's metadata and into a ``.sha256`` object beside it, which fetches verify against.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable

from schemas import ConvertOut, Progress

from ..errors import ModelSourceError
from ..settings import Settings
from ..timing import ms_since
from .archives import byte_progress
from .destinations import NoOverwrite, refuse_existing
from .s3 import s3_client, s3_error
from .storage import Location

_LEVEL = 3  # fp16 weights barely compress: a fast level loses next to nothing


class _HashingFile:
    """Counts and hashes what is written to ``raw``."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".ckpt", ".pt", ".pth")


def _member_order(path: Path) -> tuple[bool, Path]:
    """What describes the model first (index, configs, tokenizers), then the weights."""
    return (path.is_file() and path.name.endswith(_WEIGHTS), path)


def pack(model_dir: Path, out: Path, compression: str) -> tuple[str, int]:
    """Write ``model_dir``'s files to ``out`` as a deterministic .tar(.zst); return (sha256, size)."""
    with open(out, "wb") as raw:
        hashed = _HashingFile(raw)
        if compression == "zstd":
            import zstandard

            sink = zstandard.ZstdCompressor(level=_LEVEL).stream_writer(hashed, closefd=False)
        else:
            sink = hashed
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(model_dir.rglob("*"), key=_member_order):
                tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False, filter=_normalized)
        if sink is not hashed:
            sink.close()
    return hashed.sha256.hexdigest(), hashed.size


def check_destination(location: Location, settings: Settings, field: str, *, taken: bool = True) -> None:
    """Fail before a long job, not after it: when the bucket is missing or refuses us, or
    (``taken``) something is already there (requests never overwrite)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(settings)
    try:
        client.head_bucket(Bucket=location.bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            raise ModelSourceError(field, f"bucket {location.bucket!r} does not exist") from None
        raise s3_error(exc, field, location) from None
    except BotoCoreError as exc:
        raise s3_error(exc, field, location) from None
    if taken:
        refuse_existing(client, location, field, sidecar=True)


def upload(path: Path, location: Location, sha256: str, settings: Settings, field: str,
           emit: Callable[[Progress], None]) -> None:
    """Upload ``path`` to ``location`` and its digest beside it, creating both: an object
    already there is never replaced (checked, then each put is conditional)."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(settings)
    writer = NoOverwrite(client)
    on_bytes = byte_progress(emit, "upload", path.stat().st_size)
    done, lock = 0, threading.Lock()

    def progress(n: int) -> None:  # boto3 reports each increment, from several transfer threads
        nonlocal done
        with lock:
            done += n
            on_bytes(done)

    chunk = max(settings.download_chunk_mb, 5) * 2**20  # S3's smallest part is 5 MiB
    config = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                            max_concurrency=settings.download_concurrency)
    try:
        refuse_existing(client, location, field, sidecar=True)
        writer.put(field, location.display, lambda: client.upload_file(
            str(path), location.bucket, location.key, Config=config, Callback=progress,
            ExtraArgs={"Metadata": {"sha256": sha256}}))
        writer.put(field, location.display + ".sha256", lambda: client.put_object(
            Bucket=location.bucket, Key=location.key + ".sha256", Body=f"{sha256}  {location.name}\n".encode()))
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:  # the multipart upload is aborted
        raise s3_error(exc, field, location) from None


def publish(model_dir: Path, location: Location, compression: str, precision: str, *, staging: Path,
            settings: Settings, field: str, emit: Callable[[Progress], None], timings: dict[str, float]) -> ConvertOut:
    """Pack ``model_dir`` and upload it to ``location``."""
    start = time.perf_counter()
    emit(Progress(stage="pack", step=0, total=1))
    archive = staging / location.name
    sha256, size = pack(model_dir, archive, compression)
    emit(Progress(stage="pack", step=1, total=1))
    timings["pack"] = ms_since(start)
    start = time.perf_counter()
    upload(archive, location, sha256, settings, field, emit)
    timings["upload"] = ms_since(start)
    archive.unlink()
    return ConvertOut(url=location.url, sha256=sha256, size_bytes=size, precision=precision, compression=compression)


def export(source_dir: Path, variant: str | None, location: Location, precision: str, *, staging: Path,
           settings: Settings, field: str, emit: Callable[[Progress], None],
           timings: dict[str, float], t5: bool = True) -> tuple[Path, ConvertOut]:
    """Load ``source_dir`` on the CPU in ``precision``, save it as safetensors only, publish it
    (an SD3 model without its T5 if not ``t5``).

    Returns the saved directory (ready to install as the archive's cache entry) and what was
    published. The CPU does this so the GPU and the models warm on it are left alone."""
    from .loading import load_pipeline, quantized

    if quantized(source_dir):
        raise ModelSourceError(field, "the model's transformer is GGUF-quantized, which diffusers cannot save as "
                                      "safetensors: publish its .gguf file and use it as model.checkpoint_url")
    start = time.perf_counter()
    emit(Progress(stage="load", step=0, total=1))
    pipeline = load_pipeline(source_dir, precision, variant, "cpu", t5)
    emit(Progress(stage="load", step=1, total=1))
    timings["load"] = ms_since(start)
    start = time.perf_counter()
    emit(Progress(stage="save", step=0, total=1))
    saved = staging / "model"
    # Only what the pipeline uses, as safetensors: no .bin, no .ckpt, no stray files of the source.
    pipeline.save_pretrained(saved, safe_serialization=True)
    del pipeline
    emit(Progress(stage="save", step=1, total=1))
    timings["save"] = ms_since(start)
    compression = "zstd" if location.name.endswith(".zst") else "none"
    return saved, publish(saved, location, compression, precision, staging=staging, settings=settings,
                          field=field, emit=emit, timings=timings)

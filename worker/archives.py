"""Unpack a model archive while it downloads: bytes -> sha256 -> zstd -> tar -> files, one pass.

Nothing lands outside the destination: tarfile's ``data`` filter (PEP 706) refuses absolute
paths, ``..``, links that leave the tree and device files; member count and total size are
capped. The digest is checked after the last byte, before the caller installs the result.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import zstandard

from schemas import Progress

from .errors import ModelSourceError

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of chunks, hashing and counting what passes through."""

    def __init__(self, chunks: Iterator[bytes], on_bytes: Callable[[int], None]):
        self._chunks = chunks
        self._buffer = b""
        self.sha256 = hashlib.sha256()
        self.count = 0
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.sha256.update(chunk)
            self.count += len(chunk)
            self._on_bytes(self.count)
            self._buffer = chunk
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def byte_progress(emit: Callable[[Progress], None], stage: str, total: int | None, every_s: float = 0.25):
    """A byte counter (called with bytes done so far) that emits a ``stage`` event at most every
    ``every_s`` seconds, and at the end."""
    last = 0.0

    def on_bytes(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            emit(Progress(stage=stage, step=done, total=total or 0))

    return on_bytes


def extract(
    chunks: Iterator[bytes],
    dest: Path,
    *,
    field: str,
    expected_sha256: str | None,
    expected_size: int | None,
    max_bytes: int,
    max_members: int,
    on_bytes: Callable[[int], None],
) -> str:
    """Extract a .tar or .tar.zst arriving as ``chunks`` into ``dest``; return its sha256."""
    raw = _ChunkReader(chunks, on_bytes)
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    stream = buffered
    if buffered.peek(4)[:4] == _ZSTD_MAGIC:
        stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True, closefd=False)
    members = extracted = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                members += 1
                extracted += member.size
                if members > max_members:
                    raise ModelSourceError(field, f"archive has more than {max_members} members")
                if extracted > max_bytes:
                    raise ModelSourceError(field, f"archive extracts to more than {max_bytes} bytes")
                try:
                    # The data filter would quietly make an absolute name relative: refuse it instead.
                    if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                        raise tarfile.OutsideDestinationError(member, member.name)
                    tar.extract(member, dest, filter="data")
                except tarfile.FilterError as exc:
                    raise ModelSourceError(
                        field, f"archive member {member.name!r} refused: {_why(exc)}; nothing was installed"
                    ) from None
        # Read to the end, so the digest and size cover every byte: the tar's trailing blocks,
        # the rest of the zstd frame, anything after it.
        while stream.read(1 << 20):
            pass
        while buffered.read(1 << 20):
            pass
    except (tarfile.ReadError, tarfile.HeaderError, zstandard.ZstdError, EOFError) as exc:
        raise ModelSourceError(field, f"archive is truncated or corrupt ({type(exc).__name__})") from None
    if expected_size is not None and raw.count != expected_size:
        raise ModelSourceError(field, f"download ended after {raw.count} of {expected_size} bytes")
    digest = raw.sha256.hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise ModelSourceError(field, f"sha256 mismatch: expected {expected_sha256}, got {digest}")
    if members == 0:
        raise ModelSourceError(field, "archive is empty")
    return digest


def _why(exc: tarfile.FilterError) -> str:
    if isinstance(exc, (tarfile.AbsolutePathError, tarfile.OutsideDestinationError)):
        return "its path leads outside the model directory"
    if isinstance(exc, (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError)):
        return "it links outside the model directory"
    if isinstance(exc, tarfile.SpecialFileError):
        return "it is a device, pipe or other special file"
    return type(exc).__name__


def model_root(extracted: Path, field: str) -> Path:
    """The diffusers directory inside an extracted archive: at its root or in one folder."""
    if (extracted / "model_index.json").is_file():
        return extracted
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and (entries[0] / "model_index.json").is_file():
        return entries[0]
    raise ModelSourceError(field, "archive holds no diffusers model (no model_index.json at its root or in one folder)")

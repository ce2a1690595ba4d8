"""Unpack a model archive while it downloads: bytes -> sha256 -> zstd -> tar -> files, one pass.

Nothing lands outside the destination: tarfile's ``data`` filter (PEP 706) refuses absolute
paths, ``..``, links that leave the tree and device files; member count and total size are
capped. The digest is checked after the last byte, before the caller installs the result.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import zstandard

from schemas import Progress

from ..errors import ModelSourceError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = 1 << 20


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of chunks, counting what passes through and, when
    ``hashing``, feeding a sha256 on a thread of its own (hashlib lets go of the GIL), so the
    digest costs no time on the thread that decompresses and writes."""

    _BACKLOG = 8  # chunks waiting to be hashed, at most

    def __init__(self, chunks: Iterator[bytes], on_bytes: Callable[[int], None], hashing: bool):
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self.count = 0
        self._on_bytes = on_bytes
        self._sha256 = hashlib.sha256() if hashing else None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256") if hashing else None
        self._hashing: deque[Future] = deque()

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            if self._hasher:
                while len(self._hashing) >= self._BACKLOG:
                    self._hashing.popleft().result()
                self._hashing.append(self._hasher.submit(self._sha256.update, chunk))
            self.count += len(chunk)
            self._on_bytes(self.count)
            self._buffer = memoryview(chunk)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]  # a view: the rest of the chunk is not copied
        return n

    def hexdigest(self) -> str | None:
        """The sha256 of every chunk so far (None when not hashing)."""
        if not self._hasher:
            return None
        self._hasher.shutdown(wait=True)
        return self._sha256.hexdigest()

    def close(self) -> None:
        if self._hasher:
            self._hasher.shutdown(wait=False, cancel_futures=True)
        super().close()


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


Watch = Callable[[str, int, int, bool], None]  # (member name, bytes written, its size, done)


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
    watch: Watch | None = None,
) -> None:
    """Extract a .tar or .tar.zst arriving as ``chunks`` into ``dest``, checking its sha256
    against ``expected_sha256`` when given. ``watch`` hears of each regular file as it is
    written, block by block, and when it is complete (a loader can follow the files as they land)."""
    raw = _ChunkReader(chunks, on_bytes, hashing=bool(expected_sha256))
    try:
        buffered = io.BufferedReader(raw, buffer_size=_BLOCK)
        stream = buffered
        if buffered.peek(4)[:4] == _ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True, closefd=False)
        try:
            members = _unpack(stream, dest, field, max_bytes, max_members, watch)
            # Read to the end, so the digest and size cover every byte: the tar's trailing
            # blocks, the rest of the zstd frame, anything after it.
            while stream.read(_BLOCK):
                pass
            while buffered.read(_BLOCK):
                pass
        except (tarfile.ReadError, tarfile.HeaderError, zstandard.ZstdError, EOFError) as exc:
            raise ModelSourceError(field, f"archive is truncated or corrupt ({type(exc).__name__})") from None
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            raise ModelSourceError(field, f"no room left in MODELS_DIR to extract the archive "
                                   f"({os.strerror(exc.errno)}); nothing was installed") from None
        if expected_size is not None and raw.count != expected_size:
            raise ModelSourceError(field, f"download ended after {raw.count} of {expected_size} bytes")
        if expected_sha256 and (digest := raw.hexdigest()) != expected_sha256:
            raise ModelSourceError(field, f"sha256 mismatch: expected {expected_sha256}, got {digest}")
    finally:
        raw.close()  # and its hashing thread, also when the archive is refused
    if members == 0:
        raise ModelSourceError(field, "archive is empty")


class _WatchedTar(tarfile.TarFile):
    """A tar whose regular files are written in blocks of ``copybufsize``, each reported to ``watch``."""

    watch: Watch | None = None

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: str) -> None:
        if self.watch is None or tarinfo.sparse is not None:
            return super().makefile(tarinfo, targetpath)
        self.fileobj.seek(tarinfo.offset_data)
        written = 0
        with open(targetpath, "wb") as target:
            while written < tarinfo.size:
                block = self.fileobj.read(min(self.copybufsize, tarinfo.size - written))
                if not block:
                    raise tarfile.ReadError("unexpected end of data")
                target.write(block)
                target.flush()  # (what is reported written is readable from the file)
                written += len(block)
                self.watch(tarinfo.name, written, tarinfo.size, False)


def _unpack(stream, dest: Path, field: str, max_bytes: int, max_members: int, watch: Watch | None = None) -> int:
    """The members of the tar ``stream``, checked and written under ``dest``; returns their count."""
    members = extracted = 0
    # Read and write in 1 MiB blocks: tarfile's defaults (10 KiB reads from the stream, 16 KiB
    # writes) cost a Python call and a system call per few KiB of weights.
    with _WatchedTar.open(fileobj=stream, mode="r|", bufsize=_BLOCK) as tar:
        tar.copybufsize = _BLOCK
        tar.watch = watch
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
                if watch is not None and member.isreg():
                    watch(member.name, member.size, member.size, True)
            except tarfile.FilterError as exc:
                raise ModelSourceError(
                    field, f"archive member {member.name!r} refused: {_why(exc)}; nothing was installed"
                ) from None
    return members


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

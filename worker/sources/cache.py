"""Models installed on disk under MODELS_DIR: each one complete or absent, never half.

Everything is built in ``MODELS_DIR/.staging`` and renamed into place in one step, so a crash
or a bad archive leaves nothing a later job could load. A lock file per entry makes two jobs
(or two workers sharing a network volume) fetch the same model once: the second waits, then
finds it installed. With MODELS_DISK_BUDGET_GB set, the least recently used entries that no
one holds are removed after each install.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..settings import Settings

log = logging.getLogger(__name__)

KINDS = ("archives", "checkpoints", "loras", "embeddings", "controlnets", "vaes")


def entry_key(name: str, identity: str) -> str:
    """A directory name: readable (from ``name``) and unique (from ``identity``)."""
    slug = re.sub(r"(\.tar)?(\.zst)?$|\.(safetensors|ckpt)$", "", name)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip(".-")[:80] or "model"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


class DiskCache:
    def __init__(self, settings: Settings):
        self.root = settings.models_dir
        self.budget = int(settings.models_disk_budget_gb * 2**30) if settings.models_disk_budget_gb else None
        self._staging = self.root / ".staging"
        self._locks = self.root / ".locks"
        self._swept = False  # stale lock files are swept once, at the first staging

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextmanager
    def lock(self, kind: str, key: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the entry's lock (across processes); with ``wait=False`` yield False if taken.

        A lock file lives only while someone holds or waits for it: its holder removes it
        before letting go, and a waiter that then gets the lock of a removed file tries again
        on the path's new one. So MODELS_DIR/.locks does not keep a file for every URL asked."""
        self._locks.mkdir(parents=True, exist_ok=True)
        path = self._locks / f"{kind}--{key}.lock"
        while True:
            handle = open(path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.close()
                yield False
                return
            if _is_at(handle, path):
                break
            handle.close()  # removed by its last holder while we waited
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the cache's filesystem, removed afterwards whatever happens.

        Its owner holds ``<dir>.owner`` locked while it works: a worker killed mid-download
        lets go of it with its life, and the next one to stage removes what it left."""
        self._staging.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        if not self._swept:
            self._swept = True
            self._remove_stale_locks()
        fd, name = tempfile.mkstemp(dir=self._staging, suffix=".owner")
        owner = os.fdopen(fd, "a")
        fcntl.flock(owner, fcntl.LOCK_EX)  # before the directory exists: a sweeper finds it owned
        path = Path(name.removesuffix(".owner"))
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            Path(name).unlink(missing_ok=True)
            owner.close()

    def obtain(self, kind: str, key: str, build: Callable[[Path], Path]) -> tuple[Path, bool]:
        """The installed entry, built first if absent; True when this call built it.

        ``build(staging)`` fills a fresh staging directory and returns the directory to install
        (it or one inside it). It runs under the entry's lock, so it runs once however many
        jobs or workers ask at the same time; the others wait and then find the entry."""
        installed = self.path(kind, key)
        if installed.is_dir():
            self.touch(installed)
            return installed, False
        with self.lock(kind, key):
            if installed.is_dir():  # built by another job or worker while we waited
                return installed, False
            with self.staging() as staging:
                return self.install(build(staging), kind, key), True

    def install(self, built: Path, kind: str, key: str) -> Path:
        """Move a complete ``built`` directory into place (atomic rename); call under the lock."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(built, final)
        self.enforce_budget(keep=final)
        return final

    def touch(self, path: Path) -> None:
        """Mark an entry used now: eviction goes by this time."""
        os.utime(path)

    def enforce_budget(self, keep: Path) -> None:
        if self.budget is None:
            return
        entries = [p for kind in KINDS if (self.root / kind).is_dir() for p in (self.root / kind).iterdir()]
        sizes = {p: _du(p) for p in entries}
        total = sum(sizes.values())
        for path in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.budget:
                break
            if path == keep:
                continue
            with self.lock(path.parent.name, path.name, wait=False) as held:
                if held and path.exists():
                    shutil.rmtree(path)
                    total -= sizes[path]
                    log.info("evicted %s from the disk cache (%.1f MB)", path.name, sizes[path] / 2**20)

    def _remove_stale_locks(self) -> None:
        """Lock files no one holds: left by a crash, or by a version that kept them all."""
        for path in self._locks.glob("*.lock"):
            kind, _, key = path.stem.partition("--")
            with self.lock(kind, key, wait=False):
                pass  # held: its holder removes it; not held: removed now

    def _remove_stale_staging(self) -> None:
        """Staging directories whose owner is gone (killed, or crashed)."""
        for path in self._staging.iterdir():
            if path.name.endswith(".owner"):
                continue
            try:
                with open(path.with_name(path.name + ".owner"), "a") as owner:
                    try:
                        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:  # someone is working in it
                        continue
                    shutil.rmtree(path, ignore_errors=True)
                    Path(owner.name).unlink(missing_ok=True)
            except FileNotFoundError:
                pass


def _is_at(handle, path: Path) -> bool:
    """Whether the open file ``handle`` is still the file at ``path``."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())

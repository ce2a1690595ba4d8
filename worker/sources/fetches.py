"""Archive fetches in flight: one per archive, however many jobs ask, followed as they land.

A fetch starts the moment its model is known, torch-free, on a thread of its own: the default
model's archive (MODEL_URL) at start-up, a job's ``model.url`` as soon as the job is read, both
while torch and diffusers import. Whoever then needs the model joins the fetch in flight: it
hears the download's progress, gets its outcome, and can follow each file as it is written
(``Fetch.landed``), which is how a pipeline loads while its archive still arrives
(worker/sources/streaming.py). A second job for the same model waits for the one fetch.

While the process is still starting, the bytes are fetched and extracted in a process of their
own (``in_child``): on a thread, they would share the interpreter's lock with the imports of
torch and diffusers, and a thread running pure Python starves I/O threads (fetching 1.5 GB
beside one busy thread took 91 s instead of 6 s on two cores). Once the engine has imported
(``started``), a thread does: spawning a process costs more than it saves there.

A finished fetch stays here until a job has taken its outcome (its source is ``url`` for that job),
for at most a few minutes; later jobs find the model installed in MODELS_DIR.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from schemas import Progress

from ..errors import answer_for

log = logging.getLogger(__name__)

_KEPT_S = 300  # how long a finished fetch waits to be joined
_TELL_EVERY = 8 * 2**20  # a fetching process tells how far a file is written every this many bytes


@dataclass
class Landed:
    """One file of the archive, as far as it has been written."""

    path: Path  # where it is being written (in the cache's staging directory)
    written: int
    size: int
    done: bool


class Fetch:
    """One archive on its way into MODELS_DIR (see the module's docstring)."""

    def __init__(self, key: str):
        self.key = key
        self.landed: dict[Path, Landed] = {}
        self.installed: Path | None = None  # the model's directory, once installed
        self.source: str | None = None  # url, cache (installed meanwhile by another worker)
        self.error: BaseException | None = None
        self.done = False
        self.finished_at = 0.0
        self.version = 0  # counts changes, for wait()
        self._changed = threading.Condition()
        self._listeners: list[Callable[[Progress], None]] = []

    # --- The fetching side ---

    def emit(self, event: Progress) -> None:
        for listener in list(self._listeners):
            listener(event)

    def watch(self, path: Path, written: int, size: int, done: bool) -> None:
        with self._changed:
            self.landed[path] = Landed(path, written, size, done)
            self.version += 1
            self._changed.notify_all()

    def finish(self, installed: Path | None, source: str | None, error: BaseException | None) -> None:
        with self._changed:
            self.installed, self.source, self.error = installed, source, error
            self.done, self.finished_at = True, time.monotonic()
            self.version += 1
            self._changed.notify_all()

    # --- The joining side ---

    def listen(self, emit: Callable[[Progress], None]) -> None:
        """Send this fetch's download progress to ``emit`` too."""
        self._listeners.append(emit)

    def wait(self, version: int, timeout: float | None = None) -> int:
        """Until something changed since ``version`` (or the fetch ended); the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version or self.done, timeout)
            return self.version

    def snapshot(self) -> list[Landed]:
        with self._changed:
            return list(self.landed.values())

    def take(self) -> tuple[Path, str]:
        """The installed directory and its source, once the fetch has ended, or its error: taken
        by a job, so later jobs find the model installed (or fetch it anew)."""
        with self._changed:
            self._changed.wait_for(lambda: self.done)
        with _lock:
            if _fetches.get(self.key) is self:
                del _fetches[self.key]
        if self.error is not None:
            raise self.error
        return self.installed, self.source


_started = threading.Event()


def started() -> None:
    """The worker's heavy imports are done: fetches run on threads from now on."""
    _started.set()


def still_starting() -> bool:
    return not _started.is_set()


def in_child(fetch: Fetch, target: Callable, *args) -> tuple[Path, str]:
    """``target(*args, emit=, watch=)`` run in a fresh process, its progress and file events
    relayed to ``fetch``; its result, or its error raised here."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # (forking a process with threads is unsafe)
    ours, theirs = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(theirs, target, args), name="fetch", daemon=True)
    process.start()
    theirs.close()
    try:
        while True:
            try:
                kind, payload = ours.recv()
            except EOFError:
                raise RuntimeError(f"the fetching process ended unexpectedly (exit code {process.exitcode})") from None
            if kind == "watch":
                fetch.watch(*payload)
            elif kind == "emit":
                fetch.emit(payload)
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        ours.close()
        process.join(5)


def _child(conn, target: Callable, args: tuple) -> None:
    import os

    # Below the worker's own process: the first job's imports and inference come first, and the
    # download keeps what CPU is left (on a GPU worker's many cores, plenty).
    os.nice(10)
    def emit(event: Progress) -> None:
        conn.send(("emit", event))

    told: dict[Path, int] = {}

    def watch(path: Path, written: int, size: int, done: bool) -> None:
        if done or written - told.get(path, 0) >= _TELL_EVERY:  # (a message per MiB would queue up)
            told[path] = written
            conn.send(("watch", (path, written, size, done)))

    try:
        conn.send(("done", target(*args, emit=emit, watch=watch)))
    except BaseException as exc:  # noqa: BLE001 (raised again in the worker's process)
        try:
            conn.send(("error", exc))
        except Exception:  # noqa: BLE001 (not picklable: its kind is all that crosses)
            conn.send(("error", RuntimeError(type(exc).__name__)))
    finally:
        conn.close()


_lock = threading.Lock()
_fetches: dict[str, Fetch] = {}


def begin(key: str, run: Callable[[Fetch], tuple[Path, str]], installed: Callable[[], bool]) -> Fetch | None:
    """The fetch of ``key`` in flight (or finished and not yet joined); else None if
    ``installed()``; else a new one, running ``run(fetch)`` on its own thread."""
    with _lock:
        now = time.monotonic()
        for old in [k for k, f in _fetches.items() if f.done and now - f.finished_at > _KEPT_S]:
            del _fetches[old]
        if (fetch := _fetches.get(key)) is not None:
            return fetch
        if installed():
            return None
        fetch = _fetches[key] = Fetch(key)

    def fetching() -> None:
        try:
            installed, source = run(fetch)
        except BaseException as exc:  # noqa: BLE001 (handed to whoever joins)
            fetch.finish(None, None, exc)
            log.info("fetch of %s failed: %s", key, answer_for(exc, [])[0])
        else:
            fetch.finish(installed, source, None)

    threading.Thread(target=fetching, name=f"fetch-{key[:24]}", daemon=True).start()
    return fetch


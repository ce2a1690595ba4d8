"""What the per-request parts (ControlNets, VAEs, IP-Adapters) share: where their weights are,
how they load onto the model's device, and the warm set that keeps them there.

A part is a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``)
from the hub or a local path, or one ``.safetensors`` file (by URL, hub id + ``weight_name``,
or local path). Never a pickle.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from schemas import Progress

from ..errors import ModelSourceError, first_line
from ..settings import Settings
from ..sources.cache import DiskCache
from ..sources.files import hub_snapshot, locate_file

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"


class Warm:
    """Loaded parts, least recently used first; beyond ``limit`` the oldest leave the device."""

    def __init__(self) -> None:
        self._parts: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], Any]) -> tuple[Any, bool]:
        """The part under ``key``, loading it if need be; and whether it was loaded now."""
        if key in self._parts:
            self._parts.move_to_end(key)
            return self._parts[key], False
        self._parts[key] = load()
        return self._parts[key], True

    def trim(self, limit: int) -> None:
        while len(self._parts) > limit:
            self._parts.popitem(last=False)

    def values(self) -> list[Any]:
        return list(self._parts.values())

    def clear(self) -> None:
        self._parts.clear()


def locate(spec: Any, field: str, kind: str, what: str, settings: Settings, disk: DiskCache,
           emit: Callable[[Progress], None]) -> Path:
    """A diffusers directory (``what``: ControlNet, VAE) or a single .safetensors file
    (fetched into MODELS_DIR/``kind``), as a request's ``url`` / ``id`` / ``weight_name`` name it."""
    if spec.url or spec.weight_name or (spec.id.startswith("/") and Path(spec.id).is_file()):
        return locate_file(spec, field, settings, disk, emit, kind=kind)
    if spec.id.startswith("/"):
        return checked_folder(Path(spec.id), f"{field}.id", spec.id, what)
    return hub_snapshot(spec.id, ["config.json", WEIGHTS], f"{field}.id", settings,
                        lambda folder: checked_folder(folder, f"{field}.id", spec.id, what))


def checked_folder(folder: Path, field: str, name: str, what: str) -> Path:
    """``folder`` if it holds a diffusers ``what`` in safetensors."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(field, f"{name} is not a diffusers {what} (config.json missing)")
    if not (folder / WEIGHTS).is_file():
        raise ModelSourceError(field, f"{name} has no {WEIGHTS} ({what}s are loaded from safetensors only)")
    return folder


def load_module(path: Path, like: Any, field: str, what: str, from_dir: Callable[[Path], Any],
                from_file: Callable[[Path], Any] | None = None) -> Any:
    """A ``what`` from a directory or one file, on ``like``'s device and dtype; a failure
    answers for ``field``."""
    try:
        with quiet_libraries():
            module = from_dir(path) if path.is_dir() or from_file is None else from_file(path)
            module = module.to(like.device, like.dtype).eval()  # (inside: diffusers remarks on the cast)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelSourceError(field, f"could not load the {what} ({type(exc).__name__}: {first_line(exc)})") from None
    log.info("loaded %s %s", what, path.name)
    return module


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Per-file "load report" tables and "no text-encoder keys" remarks are noise in a worker's log."""
    import diffusers
    import transformers

    verbosity = transformers.logging.get_verbosity(), diffusers.utils.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity[0])
        diffusers.utils.logging.set_verbosity(verbosity[1])

"""Single files and small folders a request names (LoRAs, embeddings, ControlNets, VAEs,
IP-Adapters, preprocessors): by ``url`` (fetched like a checkpoint: parallel, resumable,
verified against ``#sha256=`` or a ``.sha256`` object, cached in MODELS_DIR/<kind>), by hub id
(its only ``.safetensors`` file, or ``weight_name``) or by local path. Never a pickle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from schemas import EmbeddingSpec, LoraSpec, Progress

from ..errors import ModelSourceError
from ..settings import Settings
from . import hub
from .cache import DiskCache, entry_key
from .checkpoints import is_safetensors, save_download
from .storage import open_download, parse_location

_MAX_FILE_BYTES = 4 * 2**30  # the largest SDXL LoRAs are about 1.7 GB


def locate_file(spec: LoraSpec | EmbeddingSpec, field: str, settings: Settings, disk: DiskCache,
                emit: Callable[[Progress], None], kind: str = "loras") -> Path:
    """The ``.safetensors`` file a request names by ``url`` (fetched into MODELS_DIR/``kind``),
    hub ``id`` (with ``weight_name``) or local path, on local disk."""
    if spec.url:
        return _fetch(spec.url, f"{field}.url", settings, disk, emit, kind)
    if spec.id.startswith("/"):
        path = Path(spec.id)
        if path.is_dir():
            path = only_safetensors(path, spec.weight_name, f"{field}.id")
        if not path.is_file() or not is_safetensors(path):
            raise ModelSourceError(f"{field}.id", f"{spec.id} is not a .safetensors file on this worker")
        return path
    return _from_hub(spec, f"{field}.id", settings)


def _fetch(url: str, field: str, settings: Settings, disk: DiskCache, emit: Callable[[Progress], None],
           kind: str) -> Path:
    location = parse_location(url, field, settings, None, "")
    key = entry_key(location.name, f"{location.display}#{location.sha256 or ''}")
    # The file keeps its name: an embedding's name is the word prompts use for it.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", location.name).removesuffix(".safetensors")[:100] or "weights"
    name += ".safetensors"

    def build(staging: Path) -> Path:
        out = staging / "file"
        out.mkdir()
        with open_download(location, field, settings, trusted=False) as download:
            save_download(download, out / name, field=field,
                          expected_sha256=location.sha256 or download.sidecar_sha256(), max_bytes=_MAX_FILE_BYTES,
                          emit=emit)
        if not is_safetensors(out / name):
            raise ModelSourceError(field, "is not a .safetensors file (pickles are not loaded)")
        return out

    entry, _ = disk.obtain(kind, key, build)
    return entry / name


def _from_hub(spec: LoraSpec | EmbeddingSpec, field: str, settings: Settings) -> Path:
    patterns = [spec.weight_name] if spec.weight_name else ["*.safetensors"]
    return hub_snapshot(spec.id, patterns, field, settings,
                        lambda folder: only_safetensors(folder, spec.weight_name, field))


def hub_snapshot(repo_id: str, patterns: list[str], field: str, settings: Settings,
                 found: Callable[[Path], Path]) -> Path:
    """``found(snapshot)`` for the hub repo's files matching ``patterns``, from a hub cache when
    one has what ``found`` needs (it raises ModelSourceError when something is missing), else
    downloaded into ours."""

    def usable(folder: Path) -> bool:
        try:
            found(folder)
        except ModelSourceError:
            return False
        return True

    snapshot, _ = hub.snapshot(repo_id, field, settings, usable=usable, allow_patterns=patterns)
    return found(snapshot)


def only_safetensors(folder: Path, weight_name: str | None, field: str) -> Path:
    if weight_name:
        if not (folder / weight_name).is_file():
            raise ModelSourceError(field, f"has no file {weight_name!r}")
        return folder / weight_name
    found = sorted(folder.rglob("*.safetensors"))
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files"
        raise ModelSourceError(field, f"has {what}; name one with weight_name")
    return found[0]

"""LoRAs for one request (``loras``): active for that job only, kept warm for the next.

Each LoRA is one ``.safetensors`` file, in diffusers' or kohya's layout (diffusers converts
the latter): from a URL (fetched like a checkpoint: parallel, resumable, verified against
``#sha256=`` or a ``.sha256`` object, cached in MODELS_DIR/loras), a hub repo (its only
``.safetensors`` file, or ``weight_name``), or a local path. Each is loaded once as a named
adapter onto the UNet (and the text encoder when the file has layers for it) and stays
resident on that loaded model, up to MAX_LOADED_LORAS; every job then activates exactly the
LoRAs it asks for at its scales, or none (adapters disabled: the base layers alone compute,
bit for bit the plain model). A load that fails takes every adapter off.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from schemas import EmbeddingSpec, LoraSpec, Progress

from ..errors import ModelSourceError, UserInputError, first_line
from ..settings import Settings
from ..sources.cache import DiskCache, entry_key
from ..sources.checkpoints import is_safetensors, save_download
from ..sources.storage import open_download, parse_location
from ..timing import ms_since

if TYPE_CHECKING:
    from ..models import Loaded

log = logging.getLogger(__name__)
_names = itertools.count()  # adapter names, unique in the process

_MAX_FILE_BYTES = 4 * 2**30  # the largest SDXL LoRAs are about 1.7 GB


def apply(loaded: Loaded, pipeline: Any, specs: list[LoraSpec], *, settings: Settings, disk: DiskCache,
          emit: Callable[[Progress], None], timings: dict[str, float]) -> None:
    """Make exactly ``specs`` active on ``loaded``'s modules (``pipeline`` shares them), at
    their scales; with no specs, the plain model. Up to MAX_LOADED_LORAS stay resident (the
    least recently used are deleted), so a LoRA used again costs a switch, not a load."""
    resident = loaded.loras
    if not specs:
        if resident:
            pipeline.disable_lora()  # adapters stay, unused: the base layers alone compute
        return
    if not hasattr(pipeline, "load_lora_weights"):
        raise UserInputError("loras", f"{type(pipeline).__name__} pipelines do not take LoRAs")
    start = time.perf_counter()
    names = []
    for i, spec in enumerate(specs):
        field = f"loras[{i}]"
        path = locate_file(spec, field, settings, disk, emit)  # a failed fetch leaves the model as it is
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in resident:
            name = f"lora_{next(_names)}"
            with _plain_on_failure(pipeline, resident):
                _load(pipeline, path, name, field)
            resident[key] = name
            log.info("loaded LoRA %s as adapter %s", path.name, name)
        resident.move_to_end(key)
        names.append(resident[key])
    if len(set(names)) < len(names):
        raise UserInputError("loras", "the same LoRA is listed twice; give it one scale")
    with _plain_on_failure(pipeline, resident):
        # Room for the next ones: the least recently used beyond the cap leave (not this request's).
        while len(resident) > max(settings.max_loaded_loras, len(names)):
            _, name = resident.popitem(last=False)
            pipeline.delete_adapters([name])
        pipeline.enable_lora()
        pipeline.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
    timings["loras"] = ms_since(start)


@contextmanager
def _plain_on_failure(pipeline: Any, resident: OrderedDict) -> Iterator[None]:
    """Whatever state a failed load or switch left behind, the model goes back to plain."""
    try:
        yield
    except BaseException:
        pipeline.unload_lora_weights()
        resident.clear()
        raise


def _load(pipeline: Any, path: Path, name: str, field: str) -> None:
    try:
        with quiet_libraries():
            pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, TypeError, OSError) as exc:
        detail = first_line(exc, 160)
        raise UserInputError(
            field, f"cannot be applied to this model ({type(exc).__name__}: {detail}); "
            "is it a LoRA for this model's architecture?"
        ) from None
    # diffusers loads a file whose keys name no layer of this model as nothing, with a warning.
    if not any(name in names for names in pipeline.get_list_adapters().values()):
        raise UserInputError(field, "matches no layer of this model: is it a LoRA for another architecture "
                                    "(SD 1.x, SDXL, SD3)?")


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


def locate_file(spec: LoraSpec | EmbeddingSpec, field: str, settings: Settings, disk: DiskCache,
                emit: Callable[[Progress], None], kind: str = "loras") -> Path:
    """The ``.safetensors`` file a request names by ``url`` (fetched into MODELS_DIR/``kind``),
    hub ``id`` (with ``weight_name``) or local path, on local disk."""
    if spec.url:
        return _fetch(spec.url, f"{field}.url", settings, disk, emit, kind)
    if spec.id.startswith("/"):
        path = Path(spec.id)
        if path.is_dir():
            path = _only_safetensors(path, spec.weight_name, f"{field}.id")
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
                        lambda folder: _only_safetensors(folder, spec.weight_name, field))


def hub_snapshot(repo_id: str, patterns: list[str], field: str, settings: Settings,
                 found: Callable[[Path], Path]) -> Path:
    """``found(snapshot)`` for the hub repo's files matching ``patterns``: from RunPod's cached
    models or our hub cache when there (``found`` raises ModelSourceError when something it
    needs is missing), else downloaded into our hub cache."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    for cache in (settings.runpod_hf_cache, settings.hub_cache):
        if cache.is_dir():
            try:
                snapshot = snapshot_download(repo_id, cache_dir=cache, local_files_only=True, token=token,
                                             allow_patterns=patterns)
                return found(Path(snapshot))
            except (hub_errors.LocalEntryNotFoundError, FileNotFoundError, ModelSourceError):
                pass
    if settings.hf_hub_offline:
        raise ModelSourceError(field, f"{repo_id} is not cached on this worker and HF_HUB_OFFLINE is set")
    try:
        snapshot = snapshot_download(repo_id, cache_dir=settings.hub_cache, token=token, allow_patterns=patterns)
    except hub_errors.GatedRepoError:
        raise ModelSourceError(field, f"{repo_id} is gated: HF_TOKEN must belong to an account with access")
    except hub_errors.RepositoryNotFoundError:
        raise ModelSourceError(field, f"{repo_id} not found on the hub (if private, set HF_TOKEN)")
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(field, f"could not download {repo_id} ({type(exc).__name__})") from None
    return found(Path(snapshot))


def _only_safetensors(folder: Path, weight_name: str | None, field: str) -> Path:
    if weight_name:
        if not (folder / weight_name).is_file():
            raise ModelSourceError(field, f"has no file {weight_name!r}")
        return folder / weight_name
    found = sorted(folder.rglob("*.safetensors"))
    if len(found) != 1:
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files"
        raise ModelSourceError(field, f"has {what}; name one with weight_name")
    return found[0]

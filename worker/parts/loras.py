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
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from schemas import LoraSpec, Progress

from ..errors import UserInputError, first_line
from ..families import Family
from ..settings import Settings
from ..sources.cache import DiskCache
from ..sources.files import locate_file
from ..timing import ms_since
from . import compiling
from .components import quiet_libraries

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
                _load(loaded.family, pipeline, path, name, field)
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
        if compiling.compiled(denoiser := loaded.family.denoiser_of(pipeline)):
            # Its scales as 0-dim tensors, inputs of the compiled graph rather than constants of
            # it: a new scale runs the kernels already compiled instead of compiling the denoiser
            # again (peft's own remedy for compiled LoRAs). Eager models keep peft's floats.
            from peft.utils import hotswap

            hotswap._convert_scalings_to_tensor(denoiser)
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


def _load(family: Family, pipeline: Any, path: Path, name: str, field: str) -> None:
    try:
        with quiet_libraries():
            family.load_lora(pipeline, path, name)
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

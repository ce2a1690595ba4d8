"""The model families this worker runs, and how a model's family is told.

A model is recognised from the component classes its ``model_index.json`` lists, before
gigabytes of it load (``at``), and a loaded pipeline from its components (``of_pipeline``); a
single-file checkpoint from its keys (``checkpoint_reference``). Everything else the worker
needs to know about a family, it asks the family (``base.Family``).

Torch-free at import: the start-up path reads ``model_index.json`` before torch is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError
from .base import ControlNetKind, Family
from .flux import FLUX, FLUX_FILL, FLUX_KONTEXT
from .flux2 import FLUX2_DEV, FLUX2_KLEIN
from .qwenimage import QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL, SDXL_REFINER
from .zimage import Z_IMAGE

__all__ = ["FAMILIES", "ControlNetKind", "Family", "at", "checkpoint_lacks", "checkpoint_reference", "components",
           "from_components", "of_pipeline", "read_index", "t5_listed", "trained", "without_t5"]

# Each family says no to the others' models: the order does not decide, except for checkpoints,
# where SDXL's keys include its refiner's.
FAMILIES: tuple[Family, ...] = (SD, SDXL, SDXL_REFINER, SD3, FLUX, FLUX_FILL, FLUX_KONTEXT, FLUX2_KLEIN, FLUX2_DEV,
                                 Z_IMAGE, QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS)


def from_components(components: dict[str, str | None]) -> Family | None:
    """The family of a model with these components (name -> class name, and its pipeline's
    class as ``_class_name``); None if not ours."""
    return next((family for family in FAMILIES if family.recognises(components)), None)


def of_pipeline(pipeline: Any) -> Family | None:
    return from_components({name: type(module).__name__ for name, module in pipeline.components.items()
                            if module is not None} | {"_class_name": type(pipeline).__name__})


def read_index(path: Path) -> dict | None:
    """The model's ``model_index.json``; None if it has none readable."""
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None


def components(index: dict) -> dict[str, str | None]:
    """A ``model_index.json``'s components: name -> class name, and ``_class_name``: its pipeline's."""
    return {k: v[1] for k, v in index.items() if isinstance(v, list) and len(v) == 2} | {
        "_class_name": index.get("_class_name")}


def at(path: Path) -> Family | None:
    """The family of the diffusers model in ``path``, refusing one this worker cannot run
    before loading gigabytes of it; None without a readable index (from_pretrained will say
    what is wrong with it)."""
    index = read_index(path)
    if index is None:
        return None
    family = from_components(components(index))
    if family is None:
        raise ModelSourceError("model.id", f"it is a {index.get('_class_name', 'non-diffusers')} model; "
                                           "this worker runs Stable Diffusion 1.x, 2.x, XL and 3 models, FLUX.1, "
                                           "FLUX.2, Qwen-Image and Z-Image")
    return family


def without_t5() -> dict[str, None]:
    """What ``model.t5: false`` leaves out, for whichever family the model turns out to be (a
    hub download is asked for before its index is read)."""
    return {name: None for family in FAMILIES for name in family.without_t5()}


def checkpoint_reference(keys: set[str], inpaint: bool) -> str | None:
    """The ``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` key of the model whose configs describe a
    single-file checkpoint with these keys; None if no family knows it."""
    return next((ref for family in FAMILIES if (ref := family.checkpoint_reference(keys, inpaint))), None)


def checkpoint_lacks(keys: set[str], t5: bool) -> list[str]:
    """The components a checkpoint with these keys comes without, as the family that knows its
    layout says (see Family.checkpoint_lacks)."""
    family = next((family for family in FAMILIES if family.checkpoint_reference(keys, False)), None)
    return family.checkpoint_lacks(keys, t5) if family else []


def trained() -> str:
    """The families training takes, as a refusal lists them."""
    names = [family.name for family in FAMILIES if family.training_pipeline]
    return ", ".join(names[:-1]) + " and " + names[-1]


def t5_listed(path: Path) -> list[str]:
    """The T5 encoder the model in ``path`` lists, if its family has one to leave out."""
    index = read_index(path) or {}
    family = from_components(components(index))
    encoder = family.optional_t5[0] if family and family.optional_t5 else None
    return [encoder] if encoder and (index.get(encoder) or [None, None])[1] else []

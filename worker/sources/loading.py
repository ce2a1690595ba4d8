"""A diffusers pipeline loaded from a directory on local disk, for inference, conversion and
training alike: refused before loading when no family of ours runs it, its T5 left out when
asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import families
from ..errors import ModelSourceError, first_line
from ..families import Family
from ..precision import dtype as precision_dtype
from .refs import ModelRef


def check_t5(ref: ModelRef, family: Family | None) -> None:
    """A request's ``t5: false`` on a model without T5 is a mistake to answer."""
    if ref.t5_asked and not ref.t5 and not (family and family.optional_t5):
        with_t5 = " and ".join(f.name for f in families.FAMILIES if f.optional_t5)
        raise ModelSourceError("model.t5", f"{ref.id} has no T5 encoder to leave out (only {with_t5} models do)")


def load_pipeline(path: Path, precision: str, variant: str | None, device: str, t5: bool = True,
                  offload: bool = False, prebuilt: dict[str, Any] | None = None) -> Any:
    """``t5``: false leaves the model's T5 out, where its family has one to leave; ``offload``:
    the weights stay in CPU RAM (each job's pipeline moves them to ``device`` as it runs);
    ``prebuilt``: components loaded already (worker/sources/streaming.py), by name."""
    from diffusers import DiffusionPipeline

    family = families.at(path)
    leave_out = family.without_t5() if family and not t5 else {}
    dtype = precision_dtype(precision)
    try:
        components = leave_out | (family.own_components(path) if family else {}) | (prebuilt or {})
        if family is None or family.denoiser not in components:
            components |= _gguf_denoiser(path, family, dtype)
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant, local_files_only=True,
                                                     **components)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        detail = first_line(exc)
        with_variant = f" (variant {variant!r})" if variant else ""
        raise ModelSourceError("model.id", f"{type(exc).__name__}{with_variant}: {detail}") from None
    if family:
        family.attach(pipeline, path)
    if not offload:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    _text_model_alias(pipeline)
    return pipeline


def quantized(path: Path) -> bool:
    """Whether the model in ``path`` has a GGUF-quantized denoiser (from a ``.gguf`` checkpoint)."""
    return any((path / "transformer").glob("*.gguf"))


def _gguf_denoiser(path: Path, family: Family | None, dtype: Any) -> dict:
    """A GGUF-quantized transformer, read with diffusers' GGUF quantizer (computing in ``dtype``)."""
    if family is None or not quantized(path):
        return {}
    import diffusers
    from diffusers import GGUFQuantizationConfig

    index = families.read_index(path) or {}
    cls = getattr(diffusers, index[family.denoiser][1])
    [file] = (path / "transformer").glob("*.gguf")
    return {family.denoiser: cls.from_single_file(str(file), quantization_config=GGUFQuantizationConfig(
        compute_dtype=dtype), config=str(path), subfolder=family.denoiser, local_files_only=True, dtype=dtype)}


def _text_model_alias(pipeline: Any) -> None:
    """diffusers 0.42 applies ``clip_skip`` through ``text_encoder.text_model.final_layer_norm``;
    transformers 5 moved that layer to ``text_encoder.final_layer_norm``. A plain attribute (not
    a registered module: nothing is saved or moved twice) lets the old path find it."""
    from types import SimpleNamespace

    encoder = getattr(pipeline, "text_encoder", None)
    if encoder is not None and hasattr(encoder, "final_layer_norm") and not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))

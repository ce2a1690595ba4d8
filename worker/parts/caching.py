"""Step caching for one request (``cache``): diffusers' cache hooks on the denoiser for the
job, off again after it, so the next job's image is the uncached one bit for bit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from schemas import CacheSpec

from ..errors import UserInputError
from .components import quiet_libraries


@contextmanager
def applied(denoiser: Any, spec: CacheSpec | None, steps: int, family: Any, pipe: Any) -> Iterator[None]:
    if spec is None:
        yield
        return
    with quiet_libraries():  # (FasterCache warns at every job that it is experimental)
        denoiser.enable_cache(_config(spec, steps, family, pipe))
    try:
        yield
    finally:
        denoiser.disable_cache()


def _config(spec: CacheSpec, steps: int, family: Any, pipe: Any) -> Any:
    import diffusers

    if spec.method == "first_block":
        return diffusers.FirstBlockCacheConfig(threshold=spec.threshold or 0.05)
    if spec.method == "taylorseer":
        return diffusers.TaylorSeerCacheConfig(cache_interval=spec.interval or 5)
    if spec.method == "magcache":
        ratios = family.mag_ratios()
        if ratios is None:
            raise UserInputError("cache.method", f"diffusers has no MagCache calibration for {family.name} models")
        return diffusers.MagCacheConfig(threshold=spec.threshold or 0.06, num_inference_steps=steps,
                                        mag_ratios=ratios)
    return diffusers.FasterCacheConfig(  # (an image model: no temporal attention; its timestep as FasterCache reads it)
        current_timestep_callback=lambda: pipe.current_timestep, tensor_format="BCHW",
        is_guidance_distilled=family.distilled_guidance, temporal_attention_block_skip_range=None,
        attention_weight_callback=lambda _: 0.3)

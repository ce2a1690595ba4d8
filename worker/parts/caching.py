"""Step caching for one request (``cache``, or the endpoint's ``CACHE``): diffusers' cache hooks
on the denoiser for the job, off again after it, so the next job's image is the uncached one bit
for bit. The answer says how many of the denoiser's passes were approximated: every hook of
diffusers' calls the module it wraps only when it computes, so a pass in which some hooked
module did not is one the cache approximated."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from schemas import CacheOut, CacheSpec

from ..errors import UserInputError
from . import compiling
from .components import quiet_libraries


@dataclass
class Tally:
    """The denoiser's passes in a job, and those the cache approximated."""

    method: str
    passes: int = 0
    approximated: int = 0
    _calls: int = 0  # calls of hooked modules in the pass under way
    _computed: int = 0  # of which computed
    compiled: bool = False  # COMPILE: the hooked blocks computed compiled

    def close_pass(self) -> None:
        if self._calls:
            self.passes += 1
            self.approximated += self._computed < self._calls
        self._calls = self._computed = 0

    def out(self) -> CacheOut:
        self.close_pass()
        return CacheOut(method=self.method, passes=self.passes, approximated=self.approximated)


def supports(family: Any, pipe: Any, spec: CacheSpec, request: Any) -> bool:
    """Whether the model's denoiser takes ``spec`` for ``request`` (an endpoint default applies
    only where it does)."""
    return (hasattr(family.denoiser_of(pipe), "enable_cache") and _refusal(family, spec, request) is None
            and (spec.method != "magcache" or family.mag_ratios() is not None))


def _refusal(family: Any, spec: CacheSpec, request: Any) -> str | None:
    if spec.method not in family.caches:
        return (f"diffusers' {spec.method} hook fails on {family.name}'s transformer: it takes "
                f"{' or '.join(family.caches)}")
    if spec.method == "faster" and family.runs_true_cfg(request):
        # (FasterCache keeps one state per block, not one per diffusers cache_context)
        return (f"faster keeps one state for the conditional and unconditional passes, which {family.name} "
                "runs apart under true CFG (true_cfg_scale with a negative_prompt): use first_block or taylorseer")
    return None


@contextmanager
def applied(denoiser: Any, spec: CacheSpec | None, request: Any, family: Any, pipe: Any) -> Iterator[Tally | None]:
    if spec is None:
        yield None
        return
    refusal = _refusal(family, spec, request)
    if refusal:
        raise UserInputError("cache.method", refusal)
    with quiet_libraries():  # (FasterCache warns at every job that it is experimental)
        denoiser.enable_cache(_config(spec, request.num_inference_steps, family, pipe))
    tally = Tally(spec.method)
    handle = denoiser.register_forward_pre_hook(lambda *_: tally.close_pass())
    wrapped: list = []
    try:
        with compiling.suspended(denoiser) as units:  # (COMPILE: each hooked unit compiled under its hook)
            wrapped = _count(denoiser, tally, units)
            yield tally
    finally:
        handle.remove()
        for ref, forward, original in wrapped:  # (removing a hook puts back what it calls: its own)
            ref.forward, ref.original_forward = forward, original
        denoiser.disable_cache()


def _count(denoiser: Any, tally: Tally, compiled_units: list) -> list:
    """Wrap each cache hook's calls: every call of the hooked module, and the calls through to
    the module itself (made only when it computes), compiled where the module is a compiled unit
    with no hooks inside it; what was wrapped, to be put back: (reference, forward, original)."""
    hooked = [module for module in denoiser.modules()  # (a registry stays behind, empty, when its hooks go)
              if getattr(module, "_diffusers_hook", None) and module._diffusers_hook.hooks]
    wrapped = []
    for module in hooked:
        for hook in module._diffusers_hook.hooks.values():
            ref = hook.fn_ref
            if ref.original_forward is None:
                continue
            wrapped.append((ref, ref.forward, ref.original_forward))
            forward = ref.original_forward
            if any(module is unit for unit in compiled_units) and not any(
                    inner is not module and inner in hooked for inner in module.modules()):
                forward = compiling.under_hook(denoiser, module, forward)
                tally.compiled = True
            ref.forward = _counted(ref.forward, tally, "_calls")
            ref.original_forward = _counted(forward, tally, "_computed")
    return wrapped


def _counted(function: Callable, tally: Tally, counter: str) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        setattr(tally, counter, getattr(tally, counter) + 1)
        return function(*args, **kwargs)

    return call


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
    # (An image model: no temporal attention; its timestep as FasterCache reads it; a family with
    # true CFG runs one pass at a time, which FasterCache must not split into two halves.)
    return diffusers.FasterCacheConfig(
        current_timestep_callback=lambda: pipe.current_timestep, tensor_format="BCHW",
        is_guidance_distilled=family.distilled_guidance or family.true_cfg, temporal_attention_block_skip_range=None,
        attention_weight_callback=lambda _: 0.3)

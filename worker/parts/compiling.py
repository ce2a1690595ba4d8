"""COMPILE: ``torch.compile`` of a loaded model's denoiser, compiled once per endpoint.

``regional`` compiles one of the denoiser's repeated blocks and reuses it for the others
(diffusers' ``compile_repeated_blocks``: seconds, not minutes, and most of the gain); ``full``
compiles the whole denoiser (a little faster, a longer compile), as ``regional`` does a UNet,
whose repeated (transformer) blocks are a small part of its work; a UNet also gets ``fuse``'s
layout. Every image size and batch is a shape of its own (``dynamic=False``: the fastest
kernels), compiled the first time it is met.

What Inductor compiles lands in its cache directory, which lives on the network volume:
``MODELS_DIR/compile/<torch, diffusers, device>``. Inductor's caches are keyed by the graph
(the model's architecture, not its weights) and the shapes, so a later worker of the endpoint
loads the kernels instead of compiling them again (bench/README.md: on CPU a fresh process
compiled from them in under a fifth of the cold time). torch's portable "mega-cache" artefacts
are not kept besides: they hold a subset of that directory, and on CPU leave the C++ kernels
to be rebuilt.

Without a compiler the worker does not try (one log line says so). A compile that fails (an
unsupported operation, a graph break, a broken toolchain) never fails the job: the call runs
eagerly, the model stays eager, and one log line says why.

Step caching: diffusers' cache hooks decide in Python, at each step, whether a block computes,
which one whole graph cannot hold (compiled with graph breaks instead, a cached job recompiled
each time and ran no faster). So for a cached job the compiled blocks step aside (``suspended``)
and each block a hook wraps runs its own forward compiled, under the hook (``under_hook``): the
decisions stay eager, the computing stays compiled. Where a hook wraps something else (FasterCache:
attention layers; ``full``: the one compiled unit is the whole denoiser), the job runs eagerly.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import first_line

log = logging.getLogger(__name__)

SIZES = 32  # shapes (size x batch) compiled per block before dynamo leaves new ones eager


def mode(setting: str | None, device: str, offload: str) -> str:
    """What ``COMPILE`` means on this worker: unset, regional on CUDA and off elsewhere (on CPU a
    compile costs more than most jobs gain); off under sequential offload, whose per-layer hooks
    the compiled graph cannot hold."""
    chosen = setting or ("regional" if device == "cuda" else "off")
    if chosen != "off" and offload == "sequential":
        log.info("COMPILE=%s is not used with OFFLOAD=sequential: the denoiser runs eagerly", chosen)
        return "off"
    if chosen != "off" and (missing := _missing_compiler(device)):
        log.warning("COMPILE=%s is not used, the denoiser runs eagerly: %s", chosen, missing)
        return "off"
    return chosen


def _missing_compiler(device: str) -> str | None:
    """Why compiling would fail for want of a compiler, said before a model spends its first
    image lowering a graph for nothing: Inductor builds CPU kernels with a C++ compiler (``CXX``,
    else g++), Triton its CUDA launchers with a C compiler (``CC``, else gcc or clang)."""
    if device == "cuda":
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
        return None if any(map(shutil.which, names)) else "no C compiler for Triton (CC, gcc or clang)"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # (InvalidCxxCompiler: none of its candidates answers --version)
        return first_line(exc, 300)
    return None


def cache_dir(models_dir: Path, device: str) -> Path:
    """Where Inductor keeps what it compiles: per torch and diffusers version and device."""
    import diffusers
    import torch

    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        where = f"cuda-sm{major}{minor}-{torch.cuda.get_device_name()}"
    else:
        where = f"{device}-{platform.machine()}"
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"torch-{torch.__version__}-diffusers-{diffusers.__version__}-{where}")
    return models_dir / "compile" / key


def configure(models_dir: Path, device: str) -> Path:
    """Point Inductor at the cache on the volume (unless the operator pointed it elsewhere)."""
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    torch._dynamo.config.cache_size_limit = SIZES
    # (Inductor writes its default into the environment when first asked, as imports may do.)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        path = cache_dir(models_dir, device)
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_denoiser(denoiser: Any, chosen: str, name: str, whole: bool = False) -> None:
    """Compile ``denoiser`` in place; ``regional`` compiles it whole (``full``) where it has no
    repeated blocks, or where they are a small part of its work (``whole``: a UNet's
    convolutions are outside its transformer blocks); ``compiled`` says how after. Compiling is
    lazy: the first call of each shape compiles, under the guard that runs it eagerly if that
    fails."""
    if chosen == "off":
        return
    if chosen == "regional" and (whole or not getattr(denoiser, "_repeated_blocks", None)):
        chosen = "full"
    if chosen == "regional":
        denoiser.compile_repeated_blocks(fullgraph=True, dynamic=False)
    else:
        denoiser.compile(fullgraph=True, dynamic=False)
    units = [module for module in denoiser.modules() if module._compiled_call_impl is not None]
    failed: list[bool] = []

    def to_eager(exc: BaseException) -> None:
        if not failed:  # (one line, whichever compiled part failed first)
            log.warning("COMPILE=%s failed for %s, which runs eagerly from now on: %s: %s", chosen, name,
                        type(exc).__name__, first_line(exc, 300))
        failed.append(True)
        for module in units:
            module._compiled_call_impl = None

    for module in units:
        module._compiled_call_impl = _guarded(module._compiled_call_impl, module._call_impl, to_eager, failed)
    denoiser._compiled = _Compiled(chosen, units, failed, to_eager)


class _Compiled:
    """What compiling did to a denoiser: how (``mode``), its compiled units, whether it fell
    back to eager, and each unit's forward compiled for running under a cache hook."""

    def __init__(self, mode: str, units: list, failed: list[bool], to_eager: Callable[[BaseException], None]):
        self.mode, self.units, self.failed, self.to_eager = mode, units, failed, to_eager
        self.forwards: dict[int, tuple[Callable, Callable]] = {}  # id(unit) -> (its forward, compiled)


def fuse(denoiser: Any, device: str) -> None:
    """A UNet's fast layout, with COMPILE: channels-last activations (tensor cores' layout for
    convolutions, CUDA only: on CPU it is slower), and each attention's q, k and v projections
    fused into one matmul (diffusers' ``fuse_qkv_projections``), used by the jobs that
    ``fused`` says may use them."""
    import torch

    if device == "cuda":
        denoiser.to(memory_format=torch.channels_last)
    denoiser.fuse_qkv_projections()  # (keeps the separate projections, and their processors)
    denoiser._fused_processors = denoiser.attn_processors


def fused(denoiser: Any, on: bool) -> None:
    """Fused q, k, v projections for this job, or the separate ones: a LoRA or an IP-Adapter
    works on the separate ones (their layers wrap ``to_q``, ``to_k``, ``to_v``)."""
    processors = getattr(denoiser, "_fused_processors", None)
    if processors is not None:  # (set_attn_processor empties the dict it is given: a copy)
        denoiser.set_attn_processor(dict(processors if on else denoiser.original_attn_processors))


def undo(denoiser: Any) -> None:
    """The denoiser eager again, as if never compiled (bench/speed.py compares both)."""
    for module in denoiser.modules():
        module._compiled_call_impl = None
    denoiser.__dict__.pop("_compiled", None)


def compiled(denoiser: Any) -> str | None:
    """How the denoiser runs compiled (``regional``, ``full``); None if eagerly (never compiled,
    or fallen back)."""
    state = getattr(denoiser, "_compiled", None)
    return state.mode if state and not state.failed else None


@contextmanager
def suspended(denoiser: Any) -> Iterator[list]:
    """The compiled units eager for a while (a cached job), compiled again after; yields them."""
    if not compiled(denoiser):
        yield []
        return
    units = denoiser._compiled.units
    saved = [module._compiled_call_impl for module in units]
    for module in units:
        module._compiled_call_impl = None
    try:
        yield units
    finally:
        if compiled(denoiser):  # (unless compiling failed meanwhile)
            for module, call in zip(units, saved):
                module._compiled_call_impl = call


def under_hook(denoiser: Any, unit: Any, forward: Callable) -> Callable:
    """``unit``'s own ``forward`` (what a cache hook calls when the unit computes), compiled;
    kept, so that each job's hooks find the same compiled function."""
    import torch

    state = denoiser._compiled
    kept = state.forwards.get(id(unit))
    if kept is None or kept[0] != forward:
        kept = state.forwards[id(unit)] = (forward, _guarded(torch.compile(forward, fullgraph=True, dynamic=False),
                                                             forward, state.to_eager, state.failed))
    return kept[1]


def _guarded(compiled_call: Callable, eager: Callable, to_eager: Callable[[BaseException], None],
             failed: list[bool]) -> Callable:
    """The compiled call; if compiling fails, the same call ``eager`` (nothing has run yet: a
    whole graph compiles before it runs), and the model eager from then on (``failed``:
    compiling failed for one of its parts)."""
    from torch._dynamo.exc import TorchDynamoException

    def call(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            try:
                return compiled_call(*args, **kwargs)
            except TorchDynamoException as exc:
                to_eager(exc)
        return eager(*args, **kwargs)

    return call


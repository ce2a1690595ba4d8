"""Inference speed: eager against COMPILE, step caching and QUANTIZE, through the worker's engine.

One model and one request; each row draws the same image (same seed) with one setting, and says
its time per image and per step (medians of ``--runs`` after a warm-up image that compiles), its
speed-up over eager, and what it costs in fidelity: PSNR and SSIM of its image against the eager
one. Then the compile time of a fresh process, cold (an empty Inductor cache) and from the
artefacts the first left (the same cache directory, as a later worker finds MODELS_DIR/compile).

    .venv/bin/python -m bench.speed                     # CPU: a FLUX.1-shaped transformer, 256 px, 20 steps
    python -m bench.speed --device cuda --model sd15 --size 512 --steps 30 --precision fp16   # tools/gpu_bench.sh
    python -m bench.speed --device cuda --model flux-dev --size 1024 --steps 28 --quantize fp8 --no-full

Models, random weights at the shapes that set the speed: ``mid`` a FLUX.1 transformer of 2 double
and 4 single blocks at width 512 with the tests' tiny text encoders and VAE (on CPU the
transformer is nearly all the work); ``flux-dev`` FLUX.1 [dev]'s shapes (bench/flux_memory.py);
``sd15`` SD 1.5's UNet with small other parts (bench/coldstart.py). Random weights make the
PSNR figures a check that each setting stays close to eager, not a measure of how a trained
model's images change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worker.parts import compiling

MODEL_ID = "bench/model"  # (hub-style names; the engines find them in memory)
BASELINE_ID = "bench/eager"
# Random weights change more from step to step than a trained model's, so first_block's threshold
# is higher here than the 0.05-0.1 used with FLUX.1 [dev]; each row says how many passes it skipped.
STEP_CACHES = {"first_block": {"method": "first_block", "threshold": 0.5},
               "taylorseer": {"method": "taylorseer", "interval": 5},
               "magcache": {"method": "magcache"}}


def build(model: str, device: str, work: Path, precision: str):
    """The pipeline in memory, on ``device``, in ``precision``."""
    from diffusers import DiffusionPipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if model == "flux-dev":
        from bench.flux_memory import build as build_flux_dev

        return build_flux_dev(False, dtype).to(device)
    if model == "sd15":
        from bench.coldstart import make_model

        path = make_model(work / "sd15-random")
    else:
        path = _mid(work / "flux-mid")
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mid(out: Path) -> Path:
    if (out / "model_index.json").is_file():
        return out
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from tests.fixtures.flux import build_flux

    tiny = FluxPipeline.from_pretrained(build_flux(out.with_name("flux-tiny")))
    torch.manual_seed(0)
    tiny.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=8, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24)).eval()
    tiny.save_pretrained(out, safe_serialization=True)
    return out


def engine_for(pipe, device: str, compile: str = "off", quantize: str = "none", model_id: str = MODEL_ID,
               denoiser_copy: bool = False):
    """A worker engine serving ``pipe`` as ``model_id``, with QUANTIZE and COMPILE applied;
    ``denoiser_copy``: with a denoiser of its own (the other components shared)."""
    import copy

    from schemas import ModelSpec
    from worker import families
    from worker.engine import Engine
    from worker.settings import Settings
    from worker.sources.refs import model_ref

    if denoiser_copy:
        name = families.of_pipeline(pipe).denoiser
        pipe = type(pipe)(**(pipe.components | {name: copy.deepcopy(getattr(pipe, name))}))
        pipe.set_progress_bar_config(disable=True)
    engine = Engine(Settings(device=device, compile=compile, quantize=quantize, safety_checker=False,
                             max_steps=1000))
    engine.models.add(model_ref(ModelSpec(id=model_id), engine.settings, device), pipe)
    return engine


def draw(engine, size: int, steps: int, cache: dict | None, model_id: str = MODEL_ID) -> tuple[float, np.ndarray, dict]:
    from schemas import InferenceRequest

    request = InferenceRequest.model_validate(
        {"prompt": "a lighthouse at dusk", "model": {"id": model_id}, "width": size, "height": size,
         "num_inference_steps": steps, "seed": 1, "cache": cache or False, "output": {"format": "png"}})
    start = time.perf_counter()
    result = engine.generate(request, lambda _: None, lambda: False)
    seconds = time.perf_counter() - start
    from tests.helpers import decode

    return seconds, np.asarray(decode(result.images[0].base64), dtype=np.float64), result.dump()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: an 11-px Gaussian window, sigma 1.5), mean over channels."""
    x, y = (torch.from_numpy(v).permute(2, 0, 1)[:, None] for v in (a, b))
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def rows(args) -> list[dict]:
    """Each setting's figures, in order: eager and the caches, then compiled, then quantized
    (in place, last: the weights change), then quantized and compiled. Each timed image of a
    setting follows one of the eager baseline (a copy of the denoiser that stays eager and
    unquantized): the speed-up is the median of those pairs' ratios, so that the machine's
    drift over minutes weighs on both sides alike."""
    pipe = build(args.model, args.device, args.work, args.precision)
    baseline = engine_for(pipe, args.device, model_id=BASELINE_ID, denoiser_copy=True)
    caches = {name: STEP_CACHES[name] for name in args.caches} if args.model != "sd15" else {}  # (UNets have none)
    quantize = args.quantize if args.model != "sd15" else "none"
    phases = [("", "off", "none"), ("compile", "regional", "none")]
    if args.full:
        phases.append(("compile full", "full", "none"))
    if quantize != "none":
        phases += [(quantize, "off", quantize), (f"{quantize} + compile", "regional", "already")]
    draw(baseline, args.size, args.steps, None, BASELINE_ID)  # warm-up
    eager_image = draw(baseline, args.size, args.steps, None, BASELINE_ID)[1]
    table = []
    for label, compile, quantizing in phases:
        engine = engine_for(pipe, args.device, compile, "none" if quantizing == "already" else quantizing)
        for cache_name, cache in [(None, None), *caches.items()]:
            name = " + ".join(part for part in (label or ("eager" if not cache else ""), cache_name) if part)
            draw(engine, args.size, args.steps, cache)  # warm-up: compiles, fills the allocator
            pairs = [(draw(baseline, args.size, args.steps, None, BASELINE_ID)[0],
                      draw(engine, args.size, args.steps, cache)) for _ in range(args.runs)]
            seconds = statistics.median(t for _, (t, _, _) in pairs)
            speedup = statistics.median(base / t for base, (t, _, _) in pairs)
            image, result = pairs[0][1][1], pairs[0][1][2]
            row = {"setting": name, "s_per_image": round(seconds, 3), "s_per_step": round(seconds / args.steps, 4),
                   "it_per_s": round(args.steps / seconds, 1), "speedup": round(speedup, 2),
                   "psnr_db": round(psnr(eager_image, image), 1), "ssim": round(ssim(eager_image, image), 4),
                   "compile": result["model"].get("compile"), "quantize": quantize if quantizing != "none" else None,
                   "cache": result.get("cache")}
            print(json.dumps(row), flush=True)
            table.append(row)
        if compile != "off":  # the next phase starts eager
            compiling.undo(engine.models.loaded()[0].family.denoiser_of(pipe))
    return table


def compile_seconds(args, cache_dir: Path) -> float:
    """A fresh process's compile time with ``cache_dir`` as Inductor's cache: its first image
    (compiling) less its second."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-m", "bench.speed", "--compile-probe", "--model", args.model,
                           "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
                           "--precision", args.precision,
                           "--work", str(args.work)], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def probe(args) -> None:
    engine = engine_for(build(args.model, args.device, args.work, args.precision), args.device, "regional")
    first = draw(engine, args.size, args.steps, None)[0]
    second = draw(engine, args.size, args.steps, None)[0]
    print(round(first - second, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mid", "flux-dev", "sd15"], default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16",
                        help="bf16 (on this CPU 2.3x fp32's speed), fp16 for sd15 on CUDA")
    parser.add_argument("--quantize", choices=["none", "int8", "fp8"], default="int8")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-speed")
    parser.add_argument("--caches", nargs="*", choices=list(STEP_CACHES), default=list(STEP_CACHES))
    parser.add_argument("--no-full", dest="full", action="store_false", help="leave out COMPILE=full's rows")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="leave out the compile times of fresh processes (each builds the model again)")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.compile_probe:
        return probe(args)
    print(json.dumps({"model": args.model, "device": args.device, "size": args.size, "steps": args.steps,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    rows(args)
    if not args.probe:
        return
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = compile_seconds(args, Path(cache_dir))
        warm = compile_seconds(args, Path(cache_dir))
    print(json.dumps({"compile_cold_s": cold, "compile_from_artefacts_s": warm, "ratio": round(warm / cold, 2)}))


if __name__ == "__main__":
    main()

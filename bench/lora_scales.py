"""A LoRA at a new scale on a compiled model: what the request costs when peft's float scale is
a constant of the compiled graph (baseline: every new scale compiles the denoiser again) against
the worker's tensor scales (worker.parts.loras, by peft's
``_convert_scalings_to_tensor``: the scale is an input of the graph).

Each side is a fresh engine with COMPILE=regional (a UNet compiles whole) and an empty Inductor
cache, as an endpoint's first worker: one plain image and one with the LoRA at scale 1 (both
compile), then one request per scale in ``--scales``, timed (the whole request: switching the
LoRA, denoising, decoding), against the same requests on an eager engine.

    .venv/bin/python -m bench.lora_scales --steps 4
    python -m bench.lora_scales --device cuda --model sd15 --size 512 --steps 20   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: the embedded model; sd15: bench.coldstart's SD 1.5-sized random model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="px (default: the model's own)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-coldstart"))
    args = parser.parse_args()

    from builder import tiny_model
    from tests.fixtures.lora_files import make_lora

    if args.model == "sd15":
        from bench.coldstart import make_model

        model = make_model(args.work / "sd15-random")
    else:
        model = tiny_model.ensure(args.work / "tiny")
    lora = make_lora(model, args.work / "lora" / f"{args.model}.safetensors", rank=16)

    eager = side(model, lora, args, compiled=False)
    ours = side(model, lora, args, compiled=True)
    baseline = side(model, lora, args, compiled=True, float_scales=True)
    print(f"\n{args.model} on {args.device}, {args.steps} steps; seconds per request at each new scale")
    print("| scale | eager | baseline: compiled, float scales | ours: compiled, tensor scales |")
    print("|---:|---:|---:|---:|")
    for i, scale in enumerate(args.scales):
        print(f"| {scale} | {eager[i]:.2f} | {baseline[i]:.2f} | {ours[i]:.2f} |")
    print(f"| median | {statistics.median(eager):.2f} | {statistics.median(baseline):.2f} "
          f"| {statistics.median(ours):.2f} |")


def side(model: Path, lora: Path, args, *, compiled: bool, float_scales: bool = False) -> list[float]:
    """Seconds per request at each of ``args.scales`` on a fresh engine, after its warm-up."""
    import torch._dynamo
    from peft.utils import hotswap

    from schemas import InferenceRequest
    from worker.engine import Engine
    from worker.settings import Settings

    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # an endpoint's first worker
    keep = hotswap._convert_scalings_to_tensor
    if float_scales:
        hotswap._convert_scalings_to_tensor = lambda model: False  # peft's floats, as diffusers leaves them
    try:
        engine = Engine(Settings(models_dir=args.work / "models", device=args.device,
                                 compile="regional" if compiled else "off"))
        sized = {"width": args.size, "height": args.size} if args.size else {}

        def request(scale: float | None) -> float:
            fields = {"prompt": "a lighthouse", "seed": 1, "num_inference_steps": args.steps,
                      "model": {"id": str(model)}} | sized
            if scale is not None:
                fields["loras"] = [{"id": str(lora), "scale": scale}]
            start = time.perf_counter()
            engine.generate(InferenceRequest.model_validate(fields), lambda _: None, lambda: False)
            return time.perf_counter() - start

        request(None)  # warm-up: the plain graph compiles here,
        request(1.0)  # and the LoRA's
        return [request(scale) for scale in args.scales]
    finally:
        hotswap._convert_scalings_to_tensor = keep


if __name__ == "__main__":
    main()

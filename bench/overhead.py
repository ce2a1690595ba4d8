"""Per-request overhead of the worker's handler against calling the same pipeline directly.

Both sides run the same tiny model in the same process, interleaved, and both end with the
images encoded as base64 PNG (what any worker must send back). The handler side is the
streaming handler RunPod calls (worker.jobs.JobRunner.stream): validation, the engine thread,
the per-job pipeline and scheduler, the result model. Target: handler <= direct x 1.03 + 10 ms.

    .venv/bin/python -m bench.overhead [--runs 30] [--size 64 256]

On a GPU, with an SD 1.5-sized UNet (bench.coldstart's random fp16 model) in fp16 on both sides:

    python -m bench.overhead --device cuda --model sd15 --steps 20 --runs 10 --size 512
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny",
                        help="the embedded tiny model, or an SD 1.5-sized UNet with random weights")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-coldstart"), help="where sd15 is built")
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    from builder import tiny_model
    from worker.jobs import JobRunner
    from worker.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    if args.model == "sd15":
        from bench.coldstart import make_model

        args.work.mkdir(parents=True, exist_ok=True)
        model_dir = make_model(args.work / "sd15-random")
    else:
        model_dir = tiny_model.ensure(work / "tiny")
    dtype = torch.float16 if args.device == "cuda" else torch.float32  # the worker's defaults
    direct_pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype).to(args.device)
    direct_pipe.set_progress_bar_config(disable=True)
    runner = JobRunner(Settings(models_dir=work, preload_model=False, device=args.device), sdk_config={})
    loop = asyncio.new_event_loop()

    def direct(size: int, seed: int) -> None:
        images = direct_pipe(
            prompt="a lighthouse", num_inference_steps=args.steps, width=size, height=size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images
        if args.device == "cuda":
            torch.cuda.synchronize()
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            base64.b64encode(buffer.getvalue())

    def handler(size: int, seed: int) -> None:
        job = {"id": f"bench-{seed}", "input": {
            "prompt": "a lighthouse", "num_inference_steps": args.steps, "width": size, "height": size,
            "seed": seed, "model": {"id": str(model_dir)},
        }}

        async def run() -> list:
            return [item async for item in runner.stream(job)]

        *_, result = loop.run_until_complete(run())
        assert result["type"] == "result", result

    print(f"torch threads: {torch.get_num_threads()}, runs per side: {args.runs}, steps: {args.steps}, "
          f"model: {args.model}, device: {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), {dtype}")
    print(f"{'size':>6} {'direct ms':>10} {'handler ms':>11} {'overhead ms':>12} {'ratio':>7} {'budget ms':>10}"
          "  verdict")
    for size in args.size:
        for seed in range(3):  # warm both paths: model load, allocator, first-call costs
            direct(size, seed)
            handler(size, seed)
        direct_ms, handler_ms = [], []
        for seed in range(args.runs):
            for fn, sink in ((direct, direct_ms), (handler, handler_ms)) if seed % 2 else (
                (handler, handler_ms), (direct, direct_ms)
            ):
                start = time.perf_counter()
                fn(size, seed)
                sink.append((time.perf_counter() - start) * 1000)
        d, h = statistics.median(direct_ms), statistics.median(handler_ms)
        budget = d * 0.03 + 10
        verdict = "ok" if h - d <= budget else "OVER"
        print(f"{size:>6} {d:>10.1f} {h:>11.1f} {h - d:>12.2f} {h / d:>7.3f} {budget:>10.1f}  {verdict}")
    loop.close()


if __name__ == "__main__":
    main()

"""What a request's LoRA costs before denoising: loaded per request (load, then unload after
the job: the simple way) against kept warm on the loaded model (worker.parts.loras.apply).

An SD 1.5-sized UNet (random weights, fp16; bench.coldstart's model) and a rank-16 LoRA on its
attention layers, on the CPU. Each round makes the LoRA active for one request and then serves
one request without it, as alternating clients would.

    .venv/bin/python -m bench.loras --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-coldstart"))
    args = parser.parse_args()

    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from bench.coldstart import make_model
    from schemas import LoraSpec
    from tests.fixtures.lora_files import make_lora
    from worker.families import of_pipeline
    from worker.models import Loaded
    from worker.parts.loras import apply
    from worker.settings import Settings
    from worker.sources.cache import DiskCache
    from worker.sources.refs import ModelRef

    diffusers.utils.logging.set_verbosity_error()  # a "no text-encoder keys" remark per load
    model = make_model(args.work / "sd15-random")
    lora = make_lora(model, args.work / "lora" / "style.safetensors", rank=16)
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float16)
    settings = Settings(models_dir=args.work / "models")
    disk = DiskCache(settings)

    # Baseline: load for the request, unload after it.
    baseline = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="request")
        pipe.set_adapters(["request"], adapter_weights=[0.8])
        pipe.unload_lora_weights()  # after the request: the next one gets the plain model
        baseline.append(time.perf_counter() - start)

    # Ours: the first use loads; later uses switch it on, a plain request switches it off.
    loaded = Loaded(ModelRef("bench", None, None, "fp16"), pipe, of_pipeline(pipe))
    spec = [LoraSpec(id=str(lora), scale=0.8)]
    start = time.perf_counter()
    apply(loaded, pipe, spec, settings=settings, disk=disk, emit=lambda event: None, timings={})
    first = time.perf_counter() - start
    warm = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        apply(loaded, pipe, spec, settings=settings, disk=disk, emit=lambda event: None, timings={})
        apply(loaded, pipe, [], settings=settings, disk=disk, emit=lambda event: None, timings={})
        warm.append(time.perf_counter() - start)

    b, w = statistics.median(baseline) * 1000, statistics.median(warm) * 1000
    print(f"LoRA {lora.stat().st_size / 1e6:.1f} MB, {args.rounds} rounds, medians")
    print(f"  baseline, load + unload per request: {b:7.1f} ms")
    print(f"  ours, first use (load):              {first * 1000:7.1f} ms")
    print(f"  ours, warm (on, then off):           {w:7.1f} ms   {b / w:.1f}x faster than the baseline")


if __name__ == "__main__":
    main()

"""FLUX.1 memory and speed with each OFFLOAD mode, on a FLUX.1-dev-shaped pipeline with random
weights (transformer of 19 double and 38 single blocks at width 3072, T5-XXL, CLIP-L, FLUX's
VAE): load time, peak GPU memory and seconds per step at 1024 px, for OFFLOAD none / model /
sequential, in bf16, through the worker's own offload (worker.pipelines.offload).

    python -m bench.flux_memory --device cuda                    # the real shape (tools/gpu_bench.sh)
    python -m bench.flux_memory --device cpu --small --size 64   # a smoke run of the same code

Random weights change no timing or memory figure: the shapes are FLUX.1 [dev]'s. The
tokenizers are the tests' tiny offline ones (prompts of a few tokens, padded as FLUX pads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tests.fixtures.sd3 import t5_tokenizer
from worker.pipelines import offload


def build(small: bool, dtype: torch.dtype):
    """The pipeline in CPU RAM, weights drawn at random (N(0, 0.02)) without a slow init."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from builder.tiny_model import clip_tokenizer

    heads, layers = (2, (1, 1)) if small else (24, (19, 38))
    t5_tok = t5_tokenizer()
    with init_empty_weights():
        transformer = FluxTransformer2DModel(
            in_channels=64, num_layers=layers[0], num_single_layers=layers[1], attention_head_dim=128,
            num_attention_heads=heads, joint_attention_dim=64 if small else 4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64 if small else 4096, d_kv=64,
                                     d_ff=128 if small else 10240, num_layers=1 if small else 24,
                                     num_heads=1 if small else 64, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=1 if small else 12, num_attention_heads=12,
                                            max_position_embeddings=77, projection_dim=768))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, use_quant_conv=False,
                            use_post_quant_conv=False, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159)
    generator = torch.Generator().manual_seed(0)
    for module in (transformer, t5, clip, vae):  # in ``dtype`` from the start: 12 B parameters in fp32 are 48 GB
        module.to(dtype).to_empty(device="cpu").eval()
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point():
                    tensor.normal_(0, 0.02, generator=generator)
                else:
                    tensor.zero_()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_gb(pipe) -> float:
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30


def measure(pipe, mode: str, device: str, size: int, steps: int) -> dict:
    """Move (none) or offload the pipeline, then draw once to warm up and once measured."""
    cuda = device == "cuda"
    start = time.perf_counter()
    if mode == "none":
        pipe.to(device)
    offload(pipe, mode, device)
    if cuda:
        torch.cuda.synchronize()
    placed = time.perf_counter() - start
    stamps: list[float] = []

    def on_step(pipeline, step, timestep, tensors):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return tensors

    args = dict(prompt="a lighthouse", width=size, height=size, num_inference_steps=steps, guidance_scale=3.5,
                max_sequence_length=512, callback_on_step_end=on_step)
    pipe(**args, generator=torch.Generator().manual_seed(0))  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps.clear()
    start = time.perf_counter()
    pipe(**args, generator=torch.Generator().manual_seed(0))
    total = time.perf_counter() - start
    per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    pipe.remove_all_hooks()
    pipe.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    return {"offload": mode, "placed_s": round(placed, 2), "s_per_step": round(per_step, 3),
            "image_s": round(total, 2), "peak_gb": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="one block of each kind, narrow encoders")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["none", "model", "sequential"])
    args = parser.parse_args()
    dtype = torch.bfloat16
    start = time.perf_counter()
    pipe = build(args.small, dtype)
    print(json.dumps({"built_s": round(time.perf_counter() - start, 1), "weights_gb": round(weights_gb(pipe), 2),
                      "size": args.size, "steps": args.steps, "device": args.device}), flush=True)
    for mode in args.modes:
        try:
            print(json.dumps(measure(pipe, mode, args.device, args.size, args.steps)), flush=True)
        except torch.OutOfMemoryError as exc:
            print(json.dumps({"offload": mode, "error": f"out of memory: {str(exc)[:120]}"}), flush=True)
            pipe.remove_all_hooks()
            pipe.to("cpu")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Generate the embedded smoke-test model: a tiny Stable Diffusion pipeline with random weights.

It is what the worker runs when no ``MODEL_ID`` is configured, and what the tests run on. It
draws noise: its only purpose is to exercise every part of the worker without a download.
Weights are seeded, so two builds on any machine hold the same numbers; nothing binary is
committed to the repository.

    python -m builder.tiny_model OUT_DIR [--inpaint]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bumped whenever the architecture or the seed changes, so a cached copy is rebuilt.
VERSION = 2
SEED = 20261126
NAME = "tiny-sd"


def clip_tokenizer():
    from transformers import CLIPTokenizer

    # A byte-level vocabulary with no merges: every UTF-8 byte is a token, so any prompt
    # tokenizes without a downloaded vocabulary. Ids 0-511 are bytes, 512/513 BOS/EOS.
    # The byte -> character table is GPT-2's, which CLIP's tokenizer uses.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_vae(**config):
    """A tiny VAE. Four blocks, like SD's: it downsamples 8x, and is 10x faster than two.
    ``config``: what differs (SD3's has 16 latent channels, for instance)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**dict(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=32,
    ) | config)


def build(out_dir: str | os.PathLike, *, inpaint: bool = False, sd_layout: bool = False) -> Path:
    """Write the tiny pipeline to ``out_dir`` (diffusers layout, safetensors weights).

    ``sd_layout``: SD 1.x's block layout (4 UNet blocks, 2 layers each, attention in the first
    three; a 2-layer VAE) with tiny widths, so single-file checkpoints in the original layout
    can be made from it and converted back."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    blocks = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if sd_layout:
        blocks = dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    unet = UNet2DConditionModel(
        sample_size=8,  # 8 latents * 8 (VAE) = 64 px by default
        in_channels=9 if inpaint else 4,
        out_channels=4,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        **blocks,
    )
    vae = tiny_vae(layers_per_block=2 if sd_layout else 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            projection_dim=32,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,  # PRK steps need more steps than a smoke test runs
        set_alpha_to_one=False,
        steps_offset=1,
    )
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    # Like SD 1.5's own config: keys other schedulers read (DDIM warns without clip_sample).
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(clip_sample=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "TINY_MODEL.json").write_text(json.dumps({"version": VERSION, "seed": SEED}))
    return out


def ensure(out_dir: str | os.PathLike, *, inpaint: bool = False, sd_layout: bool = False) -> Path:
    """Return ``out_dir`` holding the current tiny model, building it there atomically if needed."""
    out = Path(out_dir)
    marker = out / "TINY_MODEL.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash never leaves half a model to load.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp, inpaint=inpaint, sd_layout=sd_layout)
        if out.exists():
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: theirs is as good as ours
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--inpaint", action="store_true", help="9-channel inpainting UNet")
    args = parser.parse_args()
    print(ensure(args.out_dir, inpaint=args.inpaint))


if __name__ == "__main__":
    main()

"""A tiny Stable Diffusion 2.x pipeline with random weights, in SD 1.x's block layout: an
OpenCLIP-style text encoder (GELU), linear attention projections, and SD 2.1's v-prediction
DDIM scheduler. For testing SD 2.x checkpoints on the CPU."""

from __future__ import annotations

from pathlib import Path


def build_sd2(out: Path, *, output_bias: float | None = None) -> Path:
    """``output_bias``: the UNet's output forced to that constant (its last convolution's
    weights zeroed), which decides how its parameterization reads, eps or v, by A1111's probe."""
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from builder.tiny_model import _tokenizer, tiny_vae

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=12, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32,
    )
    if output_bias is not None:
        with torch.no_grad():
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.fill_(output_bias)
    vae = tiny_vae(layers_per_block=2)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu",
    ))
    scheduler = DDIMScheduler(  # SD 2.1's (768 px, v-prediction)
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

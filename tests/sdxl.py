"""A tiny Stable Diffusion XL pipeline with random weights: two text encoders, the UNet's
added time and text embeddings, SDXL's Euler scheduler. For testing SDXL paths on the CPU."""

from __future__ import annotations

from pathlib import Path

from builder.tiny_model import _tokenizer, tiny_vae


def build_sdxl(out: Path) -> Path:
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)

    def text_config(width: int, act: str) -> CLIPTextConfig:  # SDXL's: CLIP ViT-L and OpenCLIP ViT-bigG
        return CLIPTextConfig(
            vocab_size=514, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            projection_dim=width, hidden_act=act,
        )

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=32 + 48,  # both encoders' hidden states, side by side
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 48,  # six size/crop numbers + the pooled text
        norm_num_groups=32,
    )
    vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config(32, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(text_config(48, "gelu")),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sdxl_refiner(out: Path) -> Path:
    """A tiny SDXL refiner: the second text encoder only, and a UNet conditioned on an aesthetic
    score instead of the target size (five numbers instead of six)."""
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 48, norm_num_groups=32,
    )
    vae = tiny_vae()
    encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=514, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=48,
        hidden_act="gelu",
    ))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=encoder, tokenizer=None, tokenizer_2=_tokenizer(), unet=unet,
        scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out

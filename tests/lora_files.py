"""LoRA files for the tiny test models, built with peft the way trainers save them."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(model_dir: Path, out: Path, *, seed: int = 0, text_encoder: bool = False, rank: int = 4) -> Path:
    """A random LoRA (strong enough to change a 2-step image) for the model in ``model_dir``,
    saved by diffusers' ``save_lora_weights`` as ``out`` (a .safetensors file)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    generator = torch.Generator().manual_seed(seed)

    def randomized(module, targets) -> dict:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
        state = get_peft_model_state_dict(module)
        return {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in state.items()}

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    layers = {"unet_lora_layers": randomized(unet, UNET_TARGETS)}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
        layers["text_encoder_lora_layers"] = randomized(encoder, TEXT_TARGETS)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out

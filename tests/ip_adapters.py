"""Tiny IP-Adapters for the tiny models, laid out as h94/IP-Adapter is: a CLIP image encoder in
``models/image_encoder`` and the adapter's weights (``image_proj.*``: the image embedding to 4
extra tokens; ``ip_adapter.<n>.to_k_ip/to_v_ip``: keys and values for each cross-attention
layer, numbered 1, 3, 5 ... in the UNet's processor order) in ``models/``."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "models/ip-adapter_tiny.safetensors"


def build_ip_adapter(model_dir: Path, out: Path, *, seed: int = 0) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if (out / WEIGHTS).is_file():
        return out
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24,
    )).save_pretrained(out / "models" / "image_encoder", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    cross, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    weights = {
        "image_proj.proj.weight": torch.randn(4 * cross, 24) * 0.2, "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross),
    }
    number = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        width = widths[-1] if block is None else (widths[block] if name.startswith("down") else widths[::-1][block])
        for kind in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{number}.{kind}.weight"] = torch.randn(width, cross) * 0.3
        number += 2
    save_file(weights, out / WEIGHTS)
    return out

"""Tiny ControlNets for the tiny models: the model's UNet encoder copied (as ControlNet training
starts), with random instead of zero output convolutions, so that they steer from step one."""

from __future__ import annotations

from pathlib import Path


def build_controlnet(model_dir: Path, out: Path, *, seed: int = 0) -> Path:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    with torch.no_grad():
        for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            module.weight.normal_(0, 0.3)
    net.save_pretrained(out, safe_serialization=True)
    return out

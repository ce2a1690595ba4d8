"""Tiny ControlNets for the tiny models: the model's UNet encoder copied (as ControlNet training
starts), with random instead of zero output convolutions, so that they steer from step one."""

from __future__ import annotations

from pathlib import Path


def build_controlnet(model_dir: Path, out: Path, *, seed: int = 0, hint_channels=(8, 16, 32, 32)) -> Path:
    """``hint_channels``: the control image encoder's widths; real ControlNets have (16, 32, 96, 256)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    with torch.no_grad():
        for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            module.weight.normal_(0, 0.3)
    net.save_pretrained(out, safe_serialization=True)
    return out


def write_original(net_dir: Path, path: Path) -> Path:
    """The ControlNet as one .safetensors in the original layout (``control_model.*``, as
    lllyasviel's ControlNet 1.1 files are), after diffusers' convert_controlnet_checkpoint."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.ldm import unet_to_original

    weights = load_file(net_dir / "diffusion_pytorch_model.safetensors")
    config = json.loads((net_dir / "config.json").read_text())
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    special = {"controlnet_mid_block.": "middle_block_out.0.",
               "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
               "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}."}
    special |= {f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * (i + 1)}."
                for i in range(hint_blocks)}
    special |= {f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(len(weights))}
    out, encoder = {}, {}
    for key, value in weights.items():
        prefix = next((p for p in special if key.startswith(p)), None)
        if prefix:
            out[special[prefix] + key[len(prefix):]] = value
        else:
            encoder[key] = value
    out |= unet_to_original(encoder, config)
    save_file({"control_model." + k: v.contiguous() for k, v in out.items()}, path)
    return path


def build_sd3_controlnet(model_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A tiny SD3 ControlNet: one block of the model's transformer copied (Stability's and
    InstantX's copy a few), with a random instead of a zero input projection."""
    import torch
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    net = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    with torch.no_grad():
        for module in (net.pos_embed_input.proj, *net.controlnet_blocks):
            module.weight.normal_(0, 0.3)
    net.save_pretrained(out, safe_serialization=True)
    return out

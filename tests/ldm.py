"""Write a diffusers SD 1.x pipeline as an original-layout single-file checkpoint, for tests.

diffusers' wheel converts original -> diffusers only; this is the inverse for SD 1.x's block
layout (what builder.tiny_model makes with ``sd_layout=True``), after diffusers' former
scripts/convert_diffusers_to_original_stable_diffusion.py.
"""

from __future__ import annotations

from pathlib import Path


def _unet_map() -> list[tuple[str, str]]:
    """(original, diffusers) prefixes."""
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _vae_map() -> list[tuple[str, str]]:
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return pairs


_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, diffusers_name in pairs:
        key = key.replace(diffusers_name, original)
    return key


def to_original(model_dir: Path) -> dict:
    """The pipeline's weights keyed as an original SD 1.x checkpoint."""
    from safetensors.torch import load_file

    unet = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(model_dir / "text_encoder" / "model.safetensors")
    out = {}
    unet_map = _unet_map()
    for key, value in unet.items():
        renamed = key
        if "resnets" in key:
            for original, diffusers_name in _RESNET:
                renamed = renamed.replace(diffusers_name, original)
        out["model.diffusion_model." + _rename(renamed, unet_map)] = value
    vae_map = _vae_map()
    for key, value in vae.items():
        renamed = _rename(key, vae_map)
        if "attentions" in key or "mid.attn_1" in renamed:
            renamed = _rename(renamed, _VAE_ATTN)
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + renamed] = value
    for key, value in text.items():  # transformers 5 saves CLIPTextModel without "text_model."
        out["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(model_dir: Path, path: Path) -> Path:
    """``.safetensors`` or ``.ckpt`` (a pickled {"state_dict": ...}, as SD's trainers wrote)."""
    weights = to_original(model_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, path)
    else:
        import torch

        torch.save({"state_dict": weights, "global_step": 1}, path)
    return path

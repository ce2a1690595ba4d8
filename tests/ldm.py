"""Write a diffusers SD 1.x, SDXL or SD3 pipeline as an original-layout single-file checkpoint, for tests.

diffusers' wheel converts original -> diffusers only; this is the inverse, laid out from the
model's own configs (so the tiny models convert as well as full-size ones), after diffusers'
former scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py.
"""

from __future__ import annotations

import json
from pathlib import Path


def _unet_map(config: dict) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes of the UNet's blocks, for the block layout in ``config``."""
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),  # SDXL
        ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(layers):
            pairs.append((f"input_blocks.{i * (layers + 1) + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{i * (layers + 1) + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(config.get("up_block_types", ())):  # a ControlNet has no up blocks
        attention = "CrossAttn" in kind
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{i * (layers + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attention:
                pairs.append((f"output_blocks.{i * (layers + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            last = i * (layers + 1) + layers
            pairs.append((f"output_blocks.{last}.{2 if attention else 1}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _vae_map(config: dict) -> list[tuple[str, str]]:
    pairs = [("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
             ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")]
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for side in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{side}.mid.block_{i + 1}.", f"{side}.mid_block.resnets.{i}."))
    return pairs


_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    """``key`` with the first matching diffusers prefix replaced by its original."""
    for original, diffusers_name in pairs:
        if key.startswith(diffusers_name):
            return original + key[len(diffusers_name):]
    return key


def _load(folder: Path) -> tuple[dict, dict]:
    """A diffusers or transformers component's weights and config."""
    from safetensors.torch import load_file

    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name), json.loads((folder / "config.json").read_text())


def unet_to_original(weights: dict, config: dict) -> dict:
    """A UNet's (or a ControlNet's encoder half's) weights keyed as in the original layout."""
    pairs, out = _unet_map(config), {}
    for key, value in weights.items():
        renamed = _rename(key, pairs)
        if "resnets" in key:
            for original, diffusers_name in _RESNET:
                renamed = renamed.replace(diffusers_name, original)
        out[renamed] = value
    return out


def _unet(model_dir: Path) -> dict:
    return {"model.diffusion_model." + k: v for k, v in unet_to_original(*_load(model_dir / "unet")).items()}


def vae_to_original(vae_dir: Path) -> dict:
    """A diffusers VAE's weights keyed as in an original checkpoint, without the
    ``first_stage_model.`` prefix (as standalone VAE files are)."""
    weights, config = _load(vae_dir)
    pairs, out = _vae_map(config), {}
    for key, value in weights.items():
        renamed = _rename(key, pairs).replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "attentions" in key:
            prefix, _, leaf = renamed.rpartition("attn_1.")
            renamed = prefix + "attn_1." + _rename(leaf, _VAE_ATTN)
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[renamed] = value
    return out


def _clip(model_dir: Path, part: str, prefix: str) -> dict:
    """A transformers CLIP text encoder, as SD 1.x and SDXL's first embedder keep it."""
    weights, _ = _load(model_dir / part)  # transformers 5 saves CLIPTextModel without "text_model."
    top = ("text_model.", "text_projection.")  # (the projection: SD3's CLIPTextModelWithProjection)
    return {prefix + ("" if k.startswith(top) else "text_model.") + k: v for k, v in weights.items()}


def _open_clip(model_dir: Path, part: str, prefix: str) -> dict:
    """SDXL's second text encoder (or SD 2.x's) in OpenCLIP's layout: fused q/k/v,
    ``text_projection`` as a matrix (SD 2.x's encoder has none in diffusers: an identity)."""
    import torch

    weights, config = _load(model_dir / part)
    weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    projection = weights.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
        "text_projection": (projection.T if projection is not None else torch.eye(config["hidden_size"])).contiguous(),
    }
    weights.pop("embeddings.position_ids", None)
    layers = {k.split(".")[2] for k in weights if k.startswith("encoder.layers.")}
    for n in sorted(layers, key=int):
        source, target = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [weights.pop(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
            out[f"{target}attn.out_proj.{kind}"] = weights.pop(f"{source}self_attn.out_proj.{kind}")
            out[f"{target}ln_1.{kind}"] = weights.pop(f"{source}layer_norm1.{kind}")
            out[f"{target}ln_2.{kind}"] = weights.pop(f"{source}layer_norm2.{kind}")
            out[f"{target}mlp.c_fc.{kind}"] = weights.pop(f"{source}mlp.fc1.{kind}")
            out[f"{target}mlp.c_proj.{kind}"] = weights.pop(f"{source}mlp.fc2.{kind}")
    assert not weights, f"left unconverted: {sorted(weights)}"
    return {prefix + k: v for k, v in out.items()}


def _mmdit(model_dir: Path) -> dict:
    """SD3's transformer in Stability's MMDiT layout (the inverse of diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers): fused q/k/v, shift before scale in the
    last block's context norm and the final norm."""
    import torch

    w, config = _load(model_dir / "transformer")

    def shift_scale(value):  # diffusers keeps (scale, shift); the original (shift, scale)
        scale, shift = value.chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0)

    out = {"pos_embed": w.pop("pos_embed.pos_embed"), "x_embedder.proj.weight": w.pop("pos_embed.proj.weight"),
           "x_embedder.proj.bias": w.pop("pos_embed.proj.bias")}
    pairs = {"t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
             "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
    for original, name in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{original}.{kind}"] = w.pop(f"{name}.{kind}")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = shift_scale(w.pop(f"norm_out.linear.{kind}"))
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        block, x, context = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for kind in ("weight", "bias"):
            out[f"{x}attn.qkv.{kind}"] = torch.cat([w.pop(f"{block}attn.to_{p}.{kind}") for p in "qkv"])
            out[f"{context}attn.qkv.{kind}"] = torch.cat([w.pop(f"{block}attn.add_{p}_proj.{kind}") for p in "qkv"])
            out[f"{x}attn.proj.{kind}"] = w.pop(f"{block}attn.to_out.0.{kind}")
            out[f"{x}adaLN_modulation.1.{kind}"] = w.pop(f"{block}norm1.linear.{kind}")
            out[f"{x}mlp.fc1.{kind}"] = w.pop(f"{block}ff.net.0.proj.{kind}")
            out[f"{x}mlp.fc2.{kind}"] = w.pop(f"{block}ff.net.2.{kind}")
            norm = w.pop(f"{block}norm1_context.linear.{kind}")
            out[f"{context}adaLN_modulation.1.{kind}"] = shift_scale(norm) if i == last else norm
            if i != last:  # the last block's context stream ends at its attention
                out[f"{context}attn.proj.{kind}"] = w.pop(f"{block}attn.to_add_out.{kind}")
                out[f"{context}mlp.fc1.{kind}"] = w.pop(f"{block}ff_context.net.0.proj.{kind}")
                out[f"{context}mlp.fc2.{kind}"] = w.pop(f"{block}ff_context.net.2.{kind}")
    assert not w, f"left unconverted: {sorted(w)}"
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def to_original(model_dir: Path, text_encoders: bool = True) -> dict:
    """The pipeline's weights keyed as an original SD 1.x, SDXL or SD3 checkpoint; SD3's
    without its text encoders when ``text_encoders`` is false (as Stability ships SD3.5)."""
    vae = {"first_stage_model." + k: v for k, v in vae_to_original(model_dir / "vae").items()}
    if (model_dir / "transformer").is_dir():  # SD3: its CLIPs and T5 keep transformers' keys
        out = _mmdit(model_dir) | vae
        if text_encoders:
            for part, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
                out |= _clip(model_dir, part, f"text_encoders.{name}.transformer.")
            t5, _ = _load(model_dir / "text_encoder_3")  # its state_dict(): the tied embedding under both names
            t5["encoder.embed_tokens.weight"] = t5["shared.weight"].clone()
            out |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()}
        return {k: v.contiguous() for k, v in out.items()}
    out = _unet(model_dir) | vae
    if (model_dir / "text_encoder_2").is_dir():  # SDXL
        out |= _clip(model_dir, "text_encoder", "conditioner.embedders.0.transformer.")
        out |= _open_clip(model_dir, "text_encoder_2", "conditioner.embedders.1.model.")
    elif json.loads((model_dir / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu":  # SD 2.x
        out |= _open_clip(model_dir, "text_encoder", "cond_stage_model.model.")
    else:
        out |= _clip(model_dir, "text_encoder", "cond_stage_model.transformer.")
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(model_dir: Path, path: Path, text_encoders: bool = True) -> Path:
    """``.safetensors`` or ``.ckpt`` (a pickled {"state_dict": ...}, as SD's trainers wrote)."""
    weights = to_original(model_dir, text_encoders)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, path)
    else:
        import torch

        torch.save({"state_dict": weights, "global_step": 1}, path)
    return path

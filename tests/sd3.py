"""A tiny Stable Diffusion 3 pipeline with random weights: SD3's MMDiT transformer, its two CLIP
encoders and T5, a 16-channel VAE, flow matching. For testing SD3 paths on the CPU."""

from __future__ import annotations

from pathlib import Path

from builder.tiny_model import _tokenizer, tiny_vae

T5_WIDTH = 96  # the transformer's joint attention width: T5's, and the two CLIPs' (32 + 48) padded to it


def _t5_tokenizer():
    """A T5 tokenizer without a downloaded vocabulary: a unigram model over single characters."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?()[]'\"-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_sd3(out: Path) -> Path:
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(3)

    def clip(width: int, act: str) -> CLIPTextModelWithProjection:  # SD3's CLIP-L and OpenCLIP-G
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=514, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            projection_dim=width, hidden_act=act,
        ))

    clip_l = clip(32, "quick_gelu")
    with torch.no_grad():  # as SD3's own CLIP-L: no projection (diffusers reads its checkpoints so)
        clip_l.text_projection.weight.copy_(torch.eye(32))
    t5_tokenizer = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=24, d_ff=T5_WIDTH,
                                 num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=32 + 48, pos_embed_max_size=32,
    )
    vae = tiny_vae(  # SD3's: 16 latent channels, no quant convs, a shift as well as a scale
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=_tokenizer(), text_encoder_2=clip(48, "gelu"),
        tokenizer_2=_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_sd3_lora(model_dir: Path, out: Path, *, seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA on the tiny SD3's transformer (attention of both streams), saved by
    diffusers' ``save_lora_weights`` as ``out``."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    generator = torch.Generator().manual_seed(seed)
    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), transformer)
    state = get_peft_model_state_dict(transformer)
    layers = {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(out.parent, transformer_lora_layers=layers, weight_name=out.name)
    return out

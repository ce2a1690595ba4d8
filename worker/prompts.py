"""Prompts longer than CLIP's window, encoded whole instead of cut off.

CLIP reads 77 tokens: a start token, 75 of the prompt's, an end token. diffusers' pipelines
cut a longer prompt there and say so only in a log line, while AUTOMATIC1111 and ComfyUI users
write longer ones all the time. A prompt that fits is left to the pipeline (the images are
plain diffusers'); a longer one is split into windows of 75 tokens, each encoded alone with its
own start and end, and the windows' hidden states are joined along the sequence, which the
UNet's cross-attention takes at any length (AUTOMATIC1111's scheme). The other prompt of the
pair is padded to as many windows with empty ones. SDXL's pooled text comes from the first
window, as in ComfyUI.
"""

from __future__ import annotations

from typing import Any

import torch


def window_tokens(tokenizer: Any) -> int:
    """How many of a prompt's tokens one encoder pass reads (75 for CLIP)."""
    return tokenizer.model_max_length - 2


def _ids(pipe: Any, tokenizer: Any, text: str) -> list[int]:
    if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion words that stand for several vectors
        text = pipe.maybe_convert_prompt(text, tokenizer)
    return tokenizer(text, add_special_tokens=False, truncation=False).input_ids


def _windows(tokenizer: Any, ids: list[int], count: int) -> torch.Tensor:
    """``count`` rows of model_max_length ids: start, up to 75 tokens, end, padding."""
    size, length = window_tokens(tokenizer), tokenizer.model_max_length
    rows = []
    for i in range(count):
        part = ids[i * size:(i + 1) * size]
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
    return torch.tensor(rows)


def _sd(pipe: Any, ids: list[int], count: int, clip_skip: int | None) -> torch.Tensor:
    """SD 1.x/2.x: the last hidden state (or the one ``clip_skip`` layers before it, normed)."""
    encoder = pipe.text_encoder
    tokens = _windows(pipe.tokenizer, ids, count).to(encoder.device)
    if clip_skip is None:
        hidden = encoder(tokens)[0]
    else:
        hidden = encoder(tokens, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(encoder.dtype)


def _sdxl(pipe: Any, ids: list[list[int]], count: int, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate (or earlier) hidden states side by side, and the pooled
    projection of the second encoder's first window."""
    states, pooled = [], None
    for tokenizer, encoder, own in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), ids):
        if encoder is None:  # a model with only the second encoder
            continue
        out = encoder(_windows(tokenizer, own, count).to(encoder.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0][:1]
        hidden = out.hidden_states[-(clip_skip + 2) if clip_skip else -2]
        states.append(hidden.reshape(1, -1, hidden.shape[-1]))
    return torch.cat(states, dim=-1).to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder_2.dtype)


def encoded(pipe: Any, prompt: str, negative: str | None, clip_skip: int | None) -> dict | None:
    """Pipeline keywords carrying both prompts' embeddings, when either is longer than a window;
    None when both fit (the pipeline encodes them itself, exactly as diffusers does)."""
    tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    sdxl = hasattr(pipe, "text_encoder_2")
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    texts = {"prompt": prompt, "negative": negative or ""}
    ids = {name: [_ids(pipe, t, text) if t is not None else [] for t in tokenizers] for name, text in texts.items()}
    longest = max(len(i) for per_tokenizer in ids.values() for i in per_tokenizer)
    size = window_tokens(tokenizer)
    if longest <= size:
        return None
    count = -(-longest // size)
    with torch.no_grad():
        if not sdxl:
            return {"prompt_embeds": _sd(pipe, ids["prompt"][0], count, clip_skip),
                    "negative_prompt_embeds": _sd(pipe, ids["negative"][0], count, clip_skip)}
        embeds, pooled = _sdxl(pipe, ids["prompt"], count, clip_skip)
        if negative is None and pipe.config.force_zeros_for_empty_prompt:  # as the SDXL pipeline does
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _sdxl(pipe, ids["negative"], count, clip_skip)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}

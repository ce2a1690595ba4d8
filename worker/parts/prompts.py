"""Prompts as AUTOMATIC1111 reads them: longer than CLIP's window, and with weights.

CLIP reads 77 tokens: a start token, 75 of the prompt's, an end token. diffusers' pipelines
cut a longer prompt there and say so only in a log line, and read ``(word:1.3)`` as the
characters it is made of, while AUTOMATIC1111 and ComfyUI users write both all the time.

A plain prompt that fits is left to the pipeline (the images are plain diffusers'). Otherwise
the prompt is split into windows of 75 tokens (``BREAK`` starts a new one), each encoded alone
with its own start and end; each token's hidden state is scaled by its weight, and the window
rescaled to its mean before weighting; the windows are joined along the sequence, which the
UNet's cross-attention takes at any length. The other prompt of the pair is padded to as many
windows with empty ones. SDXL's pooled text comes from the first window, as in ComfyUI.

The syntax (AUTOMATIC1111's): ``(words)`` weighs 1.1 times, ``[words]`` 1/1.1 times,
``(words:1.5)`` 1.5 times; brackets nest and multiply; ``\\(`` ``\\)`` ``\\[`` ``\\]`` are the
characters themselves; an unmatched closing bracket is a character too.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import UserInputError

BREAK = None  # a piece of a parsed prompt that starts a new window
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Pieces = list[tuple[str | None, float]]  # (text or BREAK, weight)


def parse(prompt: str) -> Pieces:
    """``prompt`` as pieces of text with their weights, in order."""
    pieces: list[list] = []
    rounds: list[int] = []  # where each open "(" began in ``pieces``
    squares: list[int] = []
    text: list[str] = []

    def flush() -> None:
        for i, part in enumerate(_BREAK.split("".join(text))):
            if i:
                pieces.append([BREAK, 1.0])
            if part:
                pieces.append([part, 1.0])
        text.clear()

    def close(start: int, factor: float) -> None:
        flush()
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(prompt):
        char = prompt[i]
        weight = _WEIGHT.match(prompt, i) if char == ":" and rounds else None
        if char == "\\" and prompt[i + 1:i + 2] in ("(", ")", "[", "]", "\\"):
            text.append(prompt[i + 1])
            i += 2
            continue
        if char in "([":
            flush()
            (rounds if char == "(" else squares).append(len(pieces))
        elif weight:
            close(rounds.pop(), float(weight.group(1)))
            i = weight.end()
            continue
        elif char == ")" and rounds:
            close(rounds.pop(), 1.1)
        elif char == "]" and squares:
            close(squares.pop(), 1 / 1.1)
        else:
            text.append(char)
        i += 1
    flush()
    for start in rounds:  # left open: weighed as if closed at the end
        close(start, 1.1)
    for start in squares:
        close(start, 1 / 1.1)
    return [(text, weight) for text, weight in pieces] or [("", 1.0)]


def window_tokens(tokenizer: Any) -> int:
    """How many of a prompt's tokens one encoder pass reads (75 for CLIP)."""
    return tokenizer.model_max_length - 2


Window = list[tuple[int, float]]  # (token id, weight)


def _windows(pipe: Any, tokenizer: Any, pieces: Pieces) -> list[Window]:
    windows: list[Window] = [[]]
    for text, weight in pieces:
        if text is BREAK:
            windows.append([])
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion words that stand for several vectors
            text = pipe.maybe_convert_prompt(text, tokenizer)
        for token in tokenizer(text, add_special_tokens=False, truncation=False).input_ids:
            if len(windows[-1]) == window_tokens(tokenizer):
                windows.append([])
            windows[-1].append((token, weight))
    return windows


def tensors(tokenizer: Any, windows: list[Window], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rows of model_max_length ids (start, tokens, end, padding), and their weights."""
    length = tokenizer.model_max_length
    ids, weights = [], []
    for i in range(count):
        window = windows[i] if i < len(windows) else []
        row = [tokenizer.bos_token_id, *(t for t, _ in window), tokenizer.eos_token_id]
        ids.append(row + [tokenizer.pad_token_id] * (length - len(row)))
        weights.append([1.0, *(w for _, w in window)] + [1.0] * (length - len(window) - 1))
    return torch.tensor(ids), torch.tensor(weights)


def weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight; each window keeps its mean (AUTOMATIC1111's rescale)."""
    if bool((weights == 1).all()):
        return hidden
    weights = weights.to(hidden.device, hidden.dtype)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights[..., None]
    after = scaled.mean(dim=(1, 2), keepdim=True)
    return scaled * torch.where(after == 0, 1, before / after)


def encoded(family: Any, pipe: Any, prompt: str, negative: str | None, clip_skip: int | None,
            weighting: bool = True) -> dict | None:
    """Pipeline keywords carrying both prompts' embeddings, encoded as ``family`` encodes
    them; None for plain prompts that fit, which the pipeline encodes itself, exactly as
    diffusers does.

    ``weighting``: read the attention syntax; else the text is taken as it is (still whole).
    A family whose pipeline always encodes the prompt itself (SD3: its T5 reads 256 tokens)
    refuses weights rather than read them as characters."""
    pieces = {"prompt": prompt, "negative": negative or ""}
    pieces = {name: parse(text) if weighting else [(text, 1.0)] for name, text in pieces.items()}
    if not family.prompt_weighting:
        for name, own in pieces.items():
            if any(text is BREAK or weight != 1.0 for text, weight in own):
                field = "prompt" if name == "prompt" else "negative_prompt"
                raise UserInputError(field, f"weights like (word:1.2), [word] and BREAK are read for SD 1.x, 2.x and "
                                            f"XL models, not {family.name} ones: remove them, or send "
                                            "prompt_weighting: false to pass the text as written")
        return None
    windows = {name: [_windows(pipe, t, own) if t is not None else [[]] for t in family.tokenizers(pipe)]
               for name, own in pieces.items()}
    count = max(len(w) for per_tokenizer in windows.values() for w in per_tokenizer)
    plain = pieces["prompt"] == [(prompt, 1.0)] and pieces["negative"] == [(negative or "", 1.0)]
    if count == 1 and plain:
        return None
    with torch.no_grad():
        return family.encode_prompts(pipe, windows, count, clip_skip, negative_given=negative is not None)

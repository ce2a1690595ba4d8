"""Textual-inversion embeddings for one request (``embeddings``): new words for its prompts.

Each is one ``.safetensors`` file, found like a LoRA (URL, hub id, local path; cached in
MODELS_DIR/embeddings), in diffusers' layout (``{token: vector}``) or AUTOMATIC1111's
(``emb_params``, whose word is the file's name unless ``token`` says otherwise); SDXL files
hold a ``clip_l`` and a ``clip_g`` part, one per text encoder. The words are added to the
tokenizers for the denoising and removed after it, however it ends: they are cheap to load,
and a word left behind would change other requests' prompts.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from schemas import EmbeddingSpec, Progress

from ..errors import UserInputError, first_line
from ..families import Family
from ..settings import Settings
from ..sources.cache import DiskCache
from ..sources.files import locate_file
from ..timing import ms_since
from .components import quiet_libraries

_A1111_KEYS = ("emb_params", "string_to_param")


@contextmanager
def added(pipeline: Any, family: Family, specs: list[EmbeddingSpec], *, settings: Settings, disk: DiskCache,
          emit: Callable[[Progress], None], timings: dict[str, float]) -> Iterator[None]:
    """Run the body with ``specs``' words known to ``pipeline``'s tokenizers (those its
    ``family`` lists)."""
    if not specs:
        yield
        return
    if not hasattr(pipeline, "load_textual_inversion"):
        raise UserInputError("embeddings", f"{type(pipeline).__name__} pipelines do not take embeddings")
    start = time.perf_counter()
    encoders = family.text_encoders(pipeline)
    try:
        for i, spec in enumerate(specs):
            field = f"embeddings[{i}]"
            path = locate_file(spec, field, settings, disk, emit, kind="embeddings")
            _load(pipeline, path, spec.token, encoders, field)
        timings["embeddings"] = ms_since(start)
        yield
    finally:
        for tokenizer, encoder in encoders:
            pipeline.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)


def as_read(prompt: str) -> str:
    """``prompt`` as CLIP's tokenizer reads it (lower case). diffusers spreads an embedding of
    several vectors over its extra words only where the prompt spells the word that way, so
    "EasyNegative" would otherwise get one vector of two."""
    return prompt.lower()


def _load(pipeline: Any, path: Path, token: str | None, encoders: list, field: str) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    if "clip_l" in state and "clip_g" in state:  # SDXL: one part per text encoder
        if len(encoders) < 2:
            raise UserInputError(field, "is an SDXL embedding (clip_l / clip_g); this model has one text encoder")
        parts = [state["clip_l"], state["clip_g"]]
        token = token or path.stem
    else:
        if len(encoders) > 1:
            raise UserInputError(field, "is not an SDXL embedding (no clip_l / clip_g parts); this model is SDXL")
        parts = [state]
        if any(key in state for key in _A1111_KEYS):
            token = token or path.stem  # AUTOMATIC1111 calls an embedding by its file's name
        elif len(state) == 1:
            token = token or next(iter(state))  # diffusers' layout: {word: vector}
    # CLIP's tokenizer lowercases prompts before it looks words up: a word with capitals would
    # never match, and an embedding of several vectors would silently use only its first.
    token = token.lower() if token else None
    for part, (tokenizer, encoder) in zip(parts, encoders):
        try:
            with quiet_libraries():
                pipeline.load_textual_inversion(part, token=token, tokenizer=tokenizer, text_encoder=encoder)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            detail = first_line(exc, 160)
            raise UserInputError(field, f"cannot be added to this model ({type(exc).__name__}: {detail})") from None

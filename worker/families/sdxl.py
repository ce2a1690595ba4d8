"""Stable Diffusion XL, and its refiner: a UNet conditioned on two CLIP text encoders, the
pooled text and the image's size.

SDXL differs from SD 1.x/2.x in its prompts (both encoders' penultimate states side by side,
the second's pooled projection), its embeddings (one part per encoder) and its training (the
pooled text and sizes as added conditions). The refiner (the second encoder only) takes over
the last steps of an SDXL model's denoising; it is never a request's ``model``.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .sd import UNET_INPUT, StableDiffusion, clip_slots, token_ids


class StableDiffusionXL(StableDiffusion):
    name = "SDXL"
    kind = "an SDXL model"
    takes_refiner = True
    training_pipeline = "StableDiffusionXLPipeline"

    def recognises(self, components: dict[str, str | None]) -> bool:
        return clip_slots(components) == (True, True)

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        if UNET_INPUT in keys and any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            return "xl_inpaint" if inpaint else "xl_base"
        return None

    # --- Prompts ---

    def tokenizers(self, pipe: Any) -> list:
        return [pipe.tokenizer, pipe.tokenizer_2]

    def text_encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

    def encode_prompts(self, pipe: Any, windows: dict, count: int, clip_skip: int | None,
                       negative_given: bool) -> dict:
        import torch

        embeds, pooled = self._encode_both(pipe, windows["prompt"], count, clip_skip)
        if not negative_given and pipe.config.force_zeros_for_empty_prompt:  # as the SDXL pipeline does
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = self._encode_both(pipe, windows["negative"], count, clip_skip)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}

    @staticmethod
    def _encode_both(pipe: Any, windows: list[list], count: int, clip_skip: int | None) -> tuple[Any, Any]:
        """Both encoders' penultimate (or earlier) hidden states side by side, and the pooled
        projection of the second encoder's first window."""
        import torch

        from ..parts.prompts import tensors, weighted

        states, pooled = [], None
        pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        for (tokenizer, encoder), own in zip(pairs, windows):
            if encoder is None:  # the refiner: only the second encoder
                continue
            ids, weights = tensors(tokenizer, own, count)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0][:1]
            hidden = weighted(out.hidden_states[-(clip_skip + 2) if clip_skip else -2], weights)
            states.append(hidden.reshape(1, -1, hidden.shape[-1]))
        dtype = pipe.text_encoder_2.dtype
        return torch.cat(states, dim=-1).to(dtype), pooled.to(dtype)

    # --- Training: diffusers' train_dreambooth(_lora)_sdxl.py ---

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """Like its pipeline: both encoders' penultimate states side by side, the second's pooled output."""
        import torch

        states, pooled = [], None
        for tokenizer, encoder in self.text_encoders(pipe):
            out = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    def added_conditions(self, pooled: Any, resolution: int, batch: int) -> dict | None:
        """The pooled text; original size, crop corner, target size (square, uncropped)."""
        import torch

        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}


class Refiner(StableDiffusionXL):
    name = "SDXL refiner"
    kind = "an SDXL refiner"
    takes_refiner = False
    refines = True
    training_pipeline = None

    def recognises(self, components: dict[str, str | None]) -> bool:
        return clip_slots(components) == (False, True)

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        if UNET_INPUT in keys and any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # OpenCLIP-G
            return "xl_refiner"
        return None

    def check(self, request: Any, model: str, pipe: Any) -> None:
        raise UserInputError("model", f"{model} is an SDXL refiner: send it as refiner, beside an SDXL model")

    def text_encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        return [(pipe.tokenizer_2, pipe.text_encoder_2)]


SDXL = StableDiffusionXL()
SDXL_REFINER = Refiner()

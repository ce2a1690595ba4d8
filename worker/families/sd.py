"""Stable Diffusion 1.x and 2.x (and their inpainting models): a UNet, one CLIP text encoder.

The UNet families' defaults are ``Family``'s own; what is said here is what SD 1.x/2.x adds:
how it is recognised, its inpainting models' rule, its prompts (long and weighted, clip_skip),
and its training objective (the noise, or the velocity for v-prediction models, at a uniform
random timestep), which SDXL inherits.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UserInputError
from .base import ControlNetKind, Family

log = logging.getLogger(__name__)

# UNet ControlNets add their residuals block by block: they must share the UNet's shape.
UNET_CONTROLNET = ControlNetKind(
    "ControlNetModel", ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type"),
    "SD 1.x, 2.x or XL", "MultiControlNetModel", single_file=True)


UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"  # in every UNet checkpoint


def clip_slots(components: dict[str, str | None]) -> tuple[bool, bool] | None:
    """For a UNet model, whether each of its two text-encoder slots holds a CLIP (SD: the
    first, SDXL: both, its refiner: the second); None for models without a UNet."""
    if components.get("unet") != "UNet2DConditionModel":
        return None
    first, second = ((components.get(name) or "").startswith("CLIPTextModel") for name in ("text_encoder",
                                                                                           "text_encoder_2"))
    return first, second


class StableDiffusion(Family):
    name = "SD 1.x/2.x"
    kind = "an SD 1.x/2.x model"
    controlnet = UNET_CONTROLNET
    training_pipeline = "StableDiffusionPipeline"
    fuses_qkv = True

    def recognises(self, components: dict[str, str | None]) -> bool:
        return clip_slots(components) == (True, False)

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        if UNET_INPUT not in keys:
            return None
        if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP-H: SD 2.x
            return "inpainting_v2" if inpaint else "v2"
        if any(k.startswith("cond_stage_model.transformer.") for k in keys):  # CLIP-L: SD 1.x
            return "inpainting" if inpaint else "v1"
        return None

    def fit_reference_configs(self, pipeline: Any) -> None:
        """SD 2.x checkpoints do not say whether they predict the noise (2.0 / 2.1 base, 512 px)
        or the velocity (2.0 / 2.1, 768 px), and the reference configs assume the velocity; the
        wrong one draws noise. AUTOMATIC1111's probe tells them apart: at the last timestep, on a
        flat latent and a flat text, a velocity UNet's output lies well below its input (about
        minus the image), a noise one's does not. A noise model gets SD 2 base's configs."""
        import torch

        velocity = pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        if type(pipeline).__name__ != "StableDiffusionPipeline" or not velocity:
            return
        unet = pipeline.unet
        dtype = unet.dtype
        unet.float()  # (and back: fp16 -> fp32 -> fp16 is exact)
        try:
            with torch.no_grad():
                x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
                text = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
                drift = (unet(x, torch.tensor([999]), text).sample - x).mean().item()
        finally:
            unet.to(dtype)
        if drift < -1:
            return
        log.info("SD 2.x checkpoint predicts the noise (probe %.2f): SD 2 base's configs, 512 px", drift)
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type="epsilon")
        unet.register_to_config(sample_size=512 // pipeline.vae_scale_factor)

    def check(self, request: Any, model: str, pipe: Any) -> None:
        if pipe.unet.config.in_channels == 9 and request.task != "inpaint":
            raise UserInputError("task", f"{model} is an inpainting model (9-channel UNet): send image and mask_image")
        super().check(request, model, pipe)

    def control_images_as(self, task: str) -> str:
        # The txt2img ControlNet pipelines take them as ``image``; img2img / inpaint ones as ``control_image``.
        return "image" if task == "txt2img" else "control_image"

    def convolutional(self, pipe: Any) -> list:
        return [pipe.unet, getattr(pipe, "controlnet", None), pipe.vae]

    # --- Prompts ---

    def tokenizers(self, pipe: Any) -> list:
        return [pipe.tokenizer]

    def text_encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        return [(pipe.tokenizer, pipe.text_encoder)]

    def encode_prompts(self, pipe: Any, windows: dict, count: int, clip_skip: int | None,
                       negative_given: bool) -> dict:
        return {"prompt_embeds": self._encode(pipe, windows["prompt"][0], count, clip_skip),
                "negative_prompt_embeds": self._encode(pipe, windows["negative"][0], count, clip_skip)}

    @staticmethod
    def _encode(pipe: Any, windows: list, count: int, clip_skip: int | None) -> Any:
        """The last hidden state (or the one ``clip_skip`` layers before it, normed)."""
        from ..parts.prompts import tensors, weighted

        encoder = pipe.text_encoder
        ids, weights = tensors(pipe.tokenizer, windows, count)
        if clip_skip is None:
            hidden = encoder(ids.to(encoder.device))[0]
        else:
            hidden = encoder(ids.to(encoder.device), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        hidden = weighted(hidden, weights)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(encoder.dtype)

    # --- Training: diffusers' train_dreambooth(_lora).py ---

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        return pipe.text_encoder(token_ids(pipe.tokenizer, prompts, pipe.text_encoder.device))[0], None

    def added_conditions(self, pooled: Any, resolution: int, batch: int) -> dict | None:
        """What the UNet takes besides the text states (SDXL's pooled text and sizes)."""
        return None

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """The noise (or the velocity) at a uniform random timestep."""
        import torch

        states, pooled = text
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        steps = steps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        extra = self.added_conditions(pooled, resolution, latents.shape[0])
        prediction = pipe.unet(noisy, steps, states, added_cond_kwargs=extra).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        return prediction, target, steps


def token_ids(tokenizer: Any, prompts: list[str], device: Any) -> Any:
    """One window of tokens per prompt, as the training scripts tokenize."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids.to(device)


SD = StableDiffusion()

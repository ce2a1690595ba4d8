"""Stable Diffusion 3 and 3.5: an MMDiT transformer, two CLIPs and T5-XXL, flow matching.

Its pipelines encode prompts themselves (T5 reads 256 tokens), so weighted prompts are refused
rather than read as characters; the parts made for a UNet and CLIP (IP-Adapters, embeddings,
seamless tiling) are refused by field. Its T5 may be left out (``model.t5: false``), and its
single-file checkpoints may come without text encoders (as Stability ships SD3.5's), which the
reference model supplies. Training is train_dreambooth_lora_sd3.py's recipe: a point on the
straight path from latents to noise at a logit-normal timestep, the transformer's velocity.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import ControlNetKind, Family, pipeline_defaults
from .flow import check_flow_training, flow_point

_MMDIT = "model.diffusion_model.joint_blocks."
# The diffusers pipelines that run each task, without and with ControlNets: whose defaults a
# request that leaves them out takes.
_PIPELINES = {"txt2img": ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline"),
              "img2img": ("StableDiffusion3Img2ImgPipeline", None),
              "inpaint": ("StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetInpaintingPipeline")}
# What each text encoder's keys start with in a checkpoint that has it.
_TEXT_ENCODERS = {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                  "text_encoder_3": "text_encoders.t5xxl."}


class StableDiffusion3(Family):
    name = "SD3"
    kind = "an SD3 model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    refused = {
        "ip_adapter": "IP-Adapters here are for SD 1.x, 2.x and XL models",
        "ip_adapters": "IP-Adapters here are for SD 1.x, 2.x and XL models",
        "embeddings": "textual-inversion embeddings here are for SD 1.x, 2.x and XL models",
        "tiling": "seamless tiling needs a UNet (SD 1.x, 2.x and XL models)",
    }
    prompt_weighting = False
    training_pipeline = "StableDiffusion3Pipeline"
    optional_t5 = ("text_encoder_3", "tokenizer_3")
    # A transformer ControlNet adds to the hidden states: it must share their shape.
    controlnet = ControlNetKind(
        "SD3ControlNetModel", ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads",
                               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim"),
        "SD3", "SD3MultiControlNetModel")
    # The attention of both streams (as diffusers' train_dreambooth_lora_sd3.py).
    lora_targets = Family.lora_targets + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_layers = "transformer_lora_layers"

    def recognises(self, components: dict[str, str | None]) -> bool:
        return components.get("transformer") == "SD3Transformer2DModel"

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        if not any(k.startswith(_MMDIT) for k in keys):
            return None
        # 3.5 Medium has a second attention in its first blocks, 3.5 Large 38 blocks.
        if any(".x_block.attn2." in k for k in keys):
            return "sd35_medium"
        return "sd35_large" if any(k.startswith(_MMDIT + "37.") for k in keys) else "sd3"

    def checkpoint_lacks(self, keys: set[str], t5: bool) -> list[str]:
        if not any(k.startswith(_MMDIT) for k in keys):
            return []
        wanted = {k: v for k, v in _TEXT_ENCODERS.items() if t5 or k != "text_encoder_3"}
        return [name for name, prefix in wanted.items() if not any(k.startswith(prefix) for k in keys)]

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of the diffusers pipeline that runs ``task``: 28 steps and guidance 7 for
        txt2img, 50 steps and strength 0.6 for img2img and inpainting."""
        import diffusers

        name = _PIPELINES[task][controlnets]
        return pipeline_defaults(getattr(diffusers, name)) if name else {}

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def check(self, request: Any, model: str, pipe: Any) -> None:
        super().check(request, model, pipe)
        # diffusers has SD3 ControlNet pipelines for txt2img only (its inpainting one takes
        # inpainting ControlNets alone), and none for a hires pass.
        if request.controlnets and request.task != "txt2img":
            raise UserInputError("controlnets", f"{model} is an SD3 model; its ControlNets steer txt2img only")
        if request.controlnets and request.hires:
            raise UserInputError("hires", f"{model} is an SD3 model; its ControlNets have no hires pass")

    def img2img_size(self, width: int, height: int) -> dict:
        # Without it, its img2img pipeline resizes the input to the model's default size.
        return {"width": width, "height": height}

    def per_image(self, images: dict, count: int) -> dict:
        # Its img2img and inpaint pipelines encode image i with generator i, and would index
        # past a single image (diffusers 0.42).
        if count == 1:
            return images
        return images | {k: [images[k]] * count for k in ("image", "mask_image") if k in images}

    # --- Training ---

    def check_train(self, spec: Any) -> None:
        check_flow_training(spec, self.name, "logit-normally")

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """Its pipeline's own encoding (CLIP and T5), and the pooled CLIP text."""
        states, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=pipe.text_encoder.device,
                                                  do_classifier_free_guidance=False)
        return states, pooled

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """A point on the straight path from the latents (sigma 0) to noise (1), timesteps
        drawn logit-normally, the transformer predicting the velocity noise - latents."""
        states, pooled = text
        noisy, noise, steps = flow_point(scheduler, latents, generator, "logit_normal")
        prediction = pipe.transformer(hidden_states=noisy, timestep=steps, encoder_hidden_states=states,
                                      pooled_projections=pooled, return_dict=False)[0]
        return prediction, noise - latents, steps

    def lora_state(self, state: dict) -> dict:
        return state  # its loader reads peft's own layout (and would skip attention layers in the other)


SD3 = StableDiffusion3()

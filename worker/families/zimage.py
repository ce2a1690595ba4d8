"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream DiT over 2x2 patches of a
16-channel VAE's latents, prompts read by a Qwen3 language model through its chat template.

What Z-Image users know: classifier-free guidance runs whenever ``guidance_scale`` is above 0
(Turbo was distilled for 8-9 steps at guidance 0: send ``"num_inference_steps": 9,
"guidance_scale": 0``); a request that leaves them out gets diffusers' pipeline defaults (50
steps, guidance 5), as for every family. Sides are multiples of 16; the pipeline reads prompts
itself (up to 512 tokens), so weighted prompts are refused, and so are the parts made for a UNet
and CLIP.

Served here: txt2img, img2img and inpaint (diffusers' ZImage, ZImageImg2Img and ZImageInpaint
pipelines), LoRAs (diffusers' Z-Image loader), single-file transformers in the original layout
(ComfyUI's z_image_turbo_bf16.safetensors and fine-tunes: fused q, k, v, converted by diffusers
with the configs, text encoder and VAE of ``model.id`` or of Tongyi-MAI/Z-Image-Turbo), and LoRA
training by diffusers'
train_dreambooth_lora_z_image.py recipe. Not yet: ControlNets (issue 17).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, Family, pipeline_defaults
from .flow import check_flow_training, flow_point

_PIPELINES = {"txt2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"}
# A key of its transformer in the original layout and in diffusers' (as diffusers tells the file).
_TRANSFORMER = "layers.0.adaLN_modulation.0.weight"


class ZImage(Family):
    name = "Z-Image"
    kind = "a Z-Image model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    refused = DIT_REFUSED | {"clip_skip": "its prompts are read by a Qwen3 language model, not CLIP",
                             "controlnets": "ControlNets for Z-Image are not served here yet"}
    prompt_weighting = False
    cuda_precision = "bf16"  # (as it ships)
    training_pipeline = "ZImagePipeline"
    file_lacks = ("text_encoder", "vae")  # (transformer files)
    lora_layers = "transformer_lora_layers"

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "ZImageTransformer2DModel"
                and components.get("_class_name") == "ZImagePipeline")

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        """A Z-Image transformer file: Z-Image-Turbo's configs (diffusers' reference for them)."""
        return "z-image-turbo" if {k.removeprefix("model.diffusion_model.") for k in keys} >= {_TRANSFORMER} else None

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patches of latents

    def default_size(self, pipe: Any) -> int:
        return 1024  # (its pipeline's, whatever the model)

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, _PIPELINES[task])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``."""
        return pipeline_defaults(self.pipeline_class(task))

    def img2img_size(self, width: int, height: int) -> dict:
        return {"width": width, "height": height}

    # --- Training (diffusers' train_dreambooth_lora_z_image.py) ---

    def check_train(self, spec: Any) -> None:
        if spec.method != "lora":
            raise UserInputError("train.method", "Z-Image models train LoRAs here (as diffusers' recipe for it)")
        check_flow_training(spec, self.name, "uniformly")

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """Its pipeline's own encoding: one state per prompt, as long as its tokens (a list)."""
        states, _ = pipe.encode_prompt(prompts, device=pipe.text_encoder.device, do_classifier_free_guidance=False)
        return states, None

    def text_batch(self, encoded: list[tuple]) -> tuple:
        return [state for states, _ in encoded for state in states], None  # (each its own length)

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """The flow-matching objective, timesteps drawn uniformly: the transformer takes each
        image as one frame and the time running from noise (0) to image (1), and predicts the
        velocity's negative; against noise - latents."""
        import torch

        states, _ = text
        noisy, noise, steps = flow_point(scheduler, latents, generator, "none")
        frames = list(noisy.unsqueeze(2).unbind(0))  # each (channels, 1 frame, height, width)
        prediction = pipe.transformer(frames, (1000 - steps) / 1000, states, return_dict=False)[0]
        return -torch.stack(prediction).squeeze(2), noise - latents, steps

    def lora_state(self, state: dict) -> dict:
        return state  # its loader reads peft's own layout


Z_IMAGE = ZImage()

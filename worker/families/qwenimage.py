"""Qwen-Image (Alibaba's Qwen-Image, Qwen-Image-Edit and Edit-Plus): a double-stream DiT over
2x2 patches of its own 16-channel VAE's latents, prompts read by Qwen2.5-VL (which also looks at
the images an edit starts from).

What Qwen-Image users know: its ``guidance_scale`` does nothing (the transformer has no guidance
embedding), so it is refused; ``true_cfg_scale`` (diffusers' default 4) is its classifier-free
guidance, and it acts only with a ``negative_prompt`` (``" "`` is enough, as Qwen's examples
send). What a request leaves out takes diffusers' pipeline defaults: 50 steps, a 1024 px square,
strength 0.6 for img2img and inpainting. Sides are multiples of 16; the pipelines read prompts
themselves, so weighted prompts are refused, and so are the parts made for a UNet and CLIP.

Served here: Qwen-Image's txt2img, img2img and inpaint (diffusers' QwenImage, QwenImageImg2Img
and QwenImageInpaint pipelines); Qwen-Image-Edit's ``edit`` of one image and Edit-Plus's (the
2509 and 2511 releases) of up to three (``images``), which the prompt calls Picture 1, 2 and 3;
LoRAs. The edit pipelines size their input images themselves (to about 1 MP for the VAE, 384 px
for the vision tower), so the images go in as sent; the answer has the requested size, else the
first image's. Single-file transformers (diffusers' names, as ComfyUI's files keep them). LoRA
training of Qwen-Image by diffusers' train_dreambooth_lora_qwen_image.py
recipe. Not yet: ControlNets, training the Edit models (issue 17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, Family, pipeline_defaults
from .flow import check_flow_training, flow_point

# Keys of its transformer as one file (diffusers' names, which ComfyUI's files keep).
_TRANSFORMER = {"txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"}
_PIPELINES = {"txt2img": "QwenImagePipeline", "img2img": "QwenImageImg2ImgPipeline",
              "inpaint": "QwenImageInpaintPipeline"}


class QwenImage(Family):
    name = "Qwen-Image"
    kind = "a Qwen-Image model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    refused = DIT_REFUSED | {"clip_skip": "its prompts are read by Qwen2.5-VL, not CLIP",
                             "controlnets": "ControlNets for Qwen-Image are not served here yet"}
    prompt_weighting = False
    true_cfg = True
    cuda_precision = "bf16"  # (as it ships)
    training_pipeline = "QwenImagePipeline"
    file_lacks = ("text_encoder", "vae")  # (transformer files)
    lora_layers = "transformer_lora_layers"
    video_vae = True

    pipeline = "QwenImagePipeline"  # the model's own class, as its model_index.json names it

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "QwenImageTransformer2DModel"
                and components.get("_class_name") == self.pipeline)

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        """A Qwen-Image transformer file: Qwen-Image's configs (diffusers names no reference for
        it; an Edit model's file needs its model.id: the keys are the same)."""
        return "Qwen/Qwen-Image" if {k.removeprefix("model.diffusion_model.") for k in keys} >= _TRANSFORMER else None

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patches of latents

    def default_size(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor  # 1024

    def check(self, request: Any, model: str, pipe: Any) -> None:
        super().check(request, model, pipe)
        if not request.left_out("guidance_scale") and not pipe.transformer.config.guidance_embeds:
            raise UserInputError("guidance_scale", f"{model} is {self.kind}: its transformer has no guidance "
                                                   "embedding; its guidance is true_cfg_scale, with a negative_prompt")

    def read_a1111(self, request: Any, pipe: Any) -> Any:
        """``cfg_scale`` is its true CFG, against an empty negative prompt where none is sent
        (as Forge reads it): a transformer without guidance embedding has no other guidance."""
        if (request.left_out("guidance_scale") or not request.left_out("true_cfg_scale")
                or pipe.transformer.config.guidance_embeds):
            return request
        cfg = max(request.guidance_scale, 1.0)
        update = {"true_cfg_scale": cfg}
        if cfg > 1 and request.negative_prompt is None:
            update["negative_prompt"] = ""
        return request.reread(update, unsent={"guidance_scale"})

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, _PIPELINES[task])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``, ``true_cfg_scale`` included."""
        import inspect

        cls = self.pipeline_class(task)
        true_cfg = inspect.signature(cls.__call__).parameters["true_cfg_scale"].default
        return pipeline_defaults(cls) | {"true_cfg_scale": true_cfg}

    def call_options(self, request: Any, pipe: Any) -> dict:
        # Without a negative prompt it does nothing (and at its default 4 diffusers logs so).
        return {"true_cfg_scale": request.true_cfg_scale if request.negative_prompt is not None else 1.0}

    def img2img_size(self, width: int, height: int) -> dict:
        return {"width": width, "height": height}

    # --- Training (diffusers' train_dreambooth_lora_qwen_image.py) ---

    def check_train(self, spec: Any) -> None:
        if spec.method != "lora":
            raise UserInputError("train.method", "Qwen-Image models train LoRAs here (a full fine-tune of its 20B "
                                                 "transformer needs several GPUs' memory)")
        check_flow_training(spec, self.name, "uniformly")

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """Its pipeline's own encoding: Qwen2.5-VL's states past Qwen's template, and their mask
        (None where no prompt is padded)."""
        return pipe.encode_prompt(prompts, device=pipe.text_encoder.device)

    def text_batch(self, encoded: list[tuple]) -> tuple:
        """Prompts of different lengths padded to the longest, the mask saying which tokens are real."""
        import torch

        longest = max(states.shape[1] for states, _ in encoded)
        if all(states.shape[1] == longest and mask is None for states, mask in encoded):
            return torch.cat([states for states, _ in encoded]), None
        states = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, longest - s.shape[1])) for s, _ in encoded])
        masks = [torch.ones(s.shape[:2], dtype=torch.long, device=s.device) if m is None else m for s, m in encoded]
        return states, torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for m in masks])

    def latent_normalisation(self, pipe: Any) -> tuple[Any, Any]:
        """Its VAE's per-channel statistics: (latents - mean) / std."""
        import torch

        config = pipe.vae.config
        mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (config.latents_mean, config.latents_std))
        return mean, 1 / std

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """The flow-matching objective on packed latents, timesteps drawn uniformly (the
        script's default weighting): the transformer sees 2x2 patches of one frame, with the
        prompt's mask; its velocity, unpacked, against noise - latents."""
        from diffusers import QwenImagePipeline

        states, mask = text
        noisy, noise, steps = flow_point(scheduler, latents, generator, "none")
        count, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy, count, channels, height, width)
        prediction = pipe.transformer(hidden_states=packed, encoder_hidden_states=states,
                                      encoder_hidden_states_mask=mask, timestep=steps / 1000,
                                      img_shapes=[(1, height // 2, width // 2)] * count, return_dict=False)[0]
        factor = pipe.vae_scale_factor
        return QwenImagePipeline._unpack_latents(prediction, height * factor, width * factor, factor)[:, :, 0], \
            noise - latents, steps

    def unpacked(self, pipe: Any, latents: Any, resolution: int) -> Any:
        return pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)[:, :, 0]

    def lora_state(self, state: dict) -> dict:
        return state  # its loader reads peft's own layout


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit: instruction editing of one image (``task: "edit"``) through
    QwenImageEditPipeline; its text encoder reads the image through Qwen2-VL's processor."""

    name = "Qwen-Image-Edit"
    kind = "a Qwen-Image-Edit model"
    pipeline = "QwenImageEditPipeline"
    tasks = ("edit",)
    training_pipeline = None  # (its recipe trains on image pairs: not served here yet)
    refused = QwenImage.refused | {"controlnets": "diffusers has no Qwen-Image-Edit ControlNet pipeline"}

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def own_components(self, path: Path) -> dict[str, Any]:
        return {"processor": processor_class().from_pretrained(path / "processor")}

    def edit_inputs(self, images: list, width: int, height: int, resize_mode: str) -> dict:
        return {"image": images[0], "width": width, "height": height}


class QwenImageEditPlus(QwenImageEdit):
    """Qwen-Image-Edit-Plus (2509, 2511): edits of up to three images at once."""

    name = "Qwen-Image-Edit-Plus"
    kind = "a Qwen-Image-Edit-Plus model"
    pipeline = "QwenImageEditPlusPipeline"
    references = 3  # (what Qwen made it for: "1 to 3 input images")

    def edit_inputs(self, images: list, width: int, height: int, resize_mode: str) -> dict:
        return {"image": images, "width": width, "height": height}


def processor_class() -> Any:
    """Qwen2-VL's processor without its video processor: transformers builds that one only with
    torchvision, which the worker does not install; the edit pipelines pass it images only.
    It saves as the class it stands in for (model_index.json and processor_config.json name
    transformers' Qwen2VLProcessor, as the model's own do)."""
    from transformers import Qwen2VLProcessor

    class ImagesOnly(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = "Qwen2VLProcessor"
    ImagesOnly.__module__ = Qwen2VLProcessor.__module__
    return ImagesOnly


QWEN_IMAGE = QwenImage()
QWEN_IMAGE_EDIT = QwenImageEdit()
QWEN_IMAGE_EDIT_PLUS = QwenImageEditPlus()

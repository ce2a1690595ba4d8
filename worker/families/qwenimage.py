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
first image's. Not yet: ControlNets, training (issue 17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, Family, pipeline_defaults

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

    pipeline = "QwenImagePipeline"  # the model's own class, as its model_index.json names it

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "QwenImageTransformer2DModel"
                and components.get("_class_name") == self.pipeline)

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


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit: instruction editing of one image (``task: "edit"``) through
    QwenImageEditPipeline; its text encoder reads the image through Qwen2-VL's processor."""

    name = "Qwen-Image-Edit"
    kind = "a Qwen-Image-Edit model"
    pipeline = "QwenImageEditPipeline"
    tasks = ("edit",)
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

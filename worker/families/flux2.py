"""FLUX.2 [klein] (Black Forest Labs' 4B and 9B, base and step-distilled): FLUX.2's transformer
(double- then single-stream blocks) over 2x2 patches of its 32-channel VAE's latents, prompts
read by a Qwen3 language model (its hidden states at three depths, stacked), and multi-reference
editing: the transformer attends to the latents of the images it is given beside its own.

What [klein] users know: the distilled models (``is_distilled`` in their model_index.json, the
4B and 9B as released) run without classifier-free guidance, in about 4 steps: a
``guidance_scale`` above 1 or a ``negative_prompt`` would do nothing there, so they are refused.
The base models guide at ``guidance_scale`` (real CFG, against the ``negative_prompt``, or ""
as diffusers' pipeline does). What a request leaves out takes diffusers' pipeline defaults, as
for every family: 50 steps, guidance 4, a 1024 px square (inpainting: guidance 8, strength
0.8); send ``"num_inference_steps": 4`` to a distilled model. Sides are multiples of 16.

Served here: txt2img, ``edit`` of one image or up to four (``images``, as BFL sizes [klein]'s
multi-reference editing) through Flux2KleinPipeline, which fits each reference to at most a
megapixel, a multiple of 16, itself; inpaint through Flux2KleinInpaintPipeline; LoRAs; the
TaylorSeer step cache (diffusers' first-block and FasterCache hooks fail on its transformer).
diffusers has no FLUX.2 img2img or ControlNet pipeline. Not yet: FLUX.2 [dev] (issue 17).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, Family, pipeline_defaults

_PIPELINES = {"txt2img": "Flux2KleinPipeline", "edit": "Flux2KleinPipeline", "inpaint": "Flux2KleinInpaintPipeline"}


class Flux2Klein(Family):
    name = "FLUX.2 [klein]"
    kind = "a FLUX.2 [klein] model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    tasks = ("txt2img", "edit", "inpaint")
    references = 4
    refused = DIT_REFUSED | {"clip_skip": "its prompts are read by a Qwen3 language model, not CLIP",
                             "controlnets": "diffusers has no FLUX.2 ControlNet pipeline"}
    prompt_weighting = False
    caches = ("taylorseer",)
    cuda_precision = "bf16"  # (as it ships)

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "Flux2Transformer2DModel"
                and components.get("_class_name") == "Flux2KleinPipeline")

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patches of latents

    def default_size(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor  # 1024

    @staticmethod
    def distilled(pipe: Any) -> bool:
        return bool(pipe.config.get("is_distilled"))

    def check(self, request: Any, model: str, pipe: Any) -> None:
        super().check(request, model, pipe)
        if self.distilled(pipe):
            why = "it runs no classifier-free guidance (as diffusers runs it; about 4 steps is what it was made for)"
            if not request.left_out("guidance_scale") and request.guidance_scale > 1:
                raise UserInputError("guidance_scale", f"{model} is a step-distilled {self.name} model: {why}")
            if request.negative_prompt is not None:
                raise UserInputError("negative_prompt", f"{model} is a step-distilled {self.name} model: {why}")

    def read_a1111(self, request: Any, pipe: Any) -> Any:
        """A distilled model has no guidance for ``cfg_scale`` to set: it is read as not sent."""
        if self.distilled(pipe) and not request.left_out("guidance_scale"):
            return request.reread({}, unsent={"guidance_scale"})
        return request

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, _PIPELINES[task])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``."""
        return pipeline_defaults(self.pipeline_class(task))

    def prompt_arguments(self, pipe: Any, prompt: str, negative: str | None) -> dict:
        """Its pipelines take the negative prompt only as embeddings: encoded here, as they
        encode their own "" (the text encoder's same three layers)."""
        if negative is None:
            return {"prompt": prompt}
        embeddings, _ = pipe.encode_prompt(prompt=negative, device=pipe._execution_device)
        return {"prompt": prompt, "negative_prompt_embeds": embeddings}

    def check_reference(self, image: Any, field: str) -> None:
        """As its pipeline checks them: 64 px a side at least, at most 8:1."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        try:
            Flux2ImageProcessor.check_image_input(image)
        except ValueError as error:
            raise UserInputError(field, f"{self.name}'s edit pipeline refuses it: {error}") from None

    def edit_inputs(self, images: list, width: int, height: int, resize_mode: str) -> dict:
        return {"image": images, "width": width, "height": height}


FLUX2_KLEIN = Flux2Klein()

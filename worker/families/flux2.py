"""FLUX.2 (Black Forest Labs): one transformer design (double- then single-stream blocks over 2x2
patches of its 32-channel VAE's latents) in two releases. [klein] (4B and 9B, base and
step-distilled) reads prompts with a Qwen3 language model; [dev] (32B) with Mistral Small 3.1
(24B), and embeds a distilled guidance. Both edit by reference: the transformer attends to the
latents of the images it is given beside its own, and their pipelines fit each reference to at
most a megapixel, a multiple of 16, themselves; the answer has the requested size, else the
first image's.

What [klein] users know: the distilled models (``is_distilled`` in their model_index.json, the
4B and 9B as released) run without classifier-free guidance, in about 4 steps: a
``guidance_scale`` above 1 or a ``negative_prompt`` would do nothing there, so they are refused.
The base models guide at ``guidance_scale`` (real CFG, against the ``negative_prompt``, or ""
as diffusers' pipeline does). What [dev] users know: ``guidance_scale`` is its embedded guidance
(default 4), there is no negative prompt. What a request leaves out takes diffusers' pipeline
defaults, as for every family: 50 steps, guidance 4, a 1024 px square ([klein] inpainting:
guidance 8, strength 0.8); send ``"num_inference_steps": 4`` to a distilled [klein].

Served here: txt2img and ``edit`` (``images``: up to four for [klein], as BFL sizes its
multi-reference editing; up to ten for [dev]); [klein]'s inpainting; LoRAs; the TaylorSeer step
cache (diffusers' first-block and FasterCache hooks fail on its transformer); single-file
transformers in Black Forest Labs' layout (flux-2-klein-4b.safetensors, flux2-dev.safetensors),
the rest of the model from model.id or the reference. diffusers has no FLUX.2 img2img or
ControlNet pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, Family, pipeline_defaults

# Keys of its transformer as one file, in Black Forest Labs' layout or diffusers', and of [dev]'s
# guidance embedding in either.
_TRANSFORMER = {"single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"}
_GUIDANCE = {"guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"}


class _Flux2(Family):
    """What [klein] and [dev] share: the transformer, the VAE, reference editing."""

    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    prompt_weighting = False
    caches = ("taylorseer",)
    cuda_precision = "bf16"  # (as it ships)
    file_lacks = ("text_encoder", "vae")  # (transformer files)
    pipelines: dict[str, str] = {}  # task -> diffusers pipeline class

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "Flux2Transformer2DModel"
                and components.get("_class_name") == self.pipelines["txt2img"])

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        """A FLUX.2 transformer file: [dev]'s configs with a guidance embedding, else [klein] 4B's
        (a 9B or base [klein] file needs its model.id: the keys are the same)."""
        keys = {k.removeprefix("model.diffusion_model.") for k in keys}
        if not keys & _TRANSFORMER:
            return None
        return "flux-2-dev" if keys & _GUIDANCE else "black-forest-labs/FLUX.2-klein-4B"

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patches of latents

    def default_size(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor  # 1024

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, self.pipelines[task])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``."""
        return pipeline_defaults(self.pipeline_class(task))

    def check_reference(self, image: Any, field: str) -> None:
        """As its pipelines check them: 64 px a side at least, at most 8:1."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        try:
            Flux2ImageProcessor.check_image_input(image)
        except ValueError as error:
            raise UserInputError(field, f"{self.name}'s edit pipeline refuses it: {error}") from None

    def edit_inputs(self, images: list, width: int, height: int, resize_mode: str) -> dict:
        return {"image": images, "width": width, "height": height}


class Flux2Klein(_Flux2):
    name = "FLUX.2 [klein]"
    kind = "a FLUX.2 [klein] model"
    tasks = ("txt2img", "edit", "inpaint")
    references = 4
    refused = DIT_REFUSED | {"clip_skip": "its prompts are read by a Qwen3 language model, not CLIP",
                             "controlnets": "diffusers has no FLUX.2 ControlNet pipeline"}
    pipelines = {"txt2img": "Flux2KleinPipeline", "edit": "Flux2KleinPipeline", "inpaint": "Flux2KleinInpaintPipeline"}

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

    def prompt_arguments(self, pipe: Any, prompt: str, negative: str | None) -> dict:
        """Its pipelines take the negative prompt only as embeddings: encoded here, as they
        encode their own "" (the text encoder's same three layers)."""
        if negative is None:
            return {"prompt": prompt}
        embeddings, _ = pipe.encode_prompt(prompt=negative, device=pipe._execution_device)
        return {"prompt": prompt, "negative_prompt_embeds": embeddings}


class Flux2Dev(_Flux2):
    """FLUX.2 [dev]: guidance-distilled (``guidance_scale`` is embedded), read by Mistral Small 3.1."""

    name = "FLUX.2 [dev]"
    kind = "a FLUX.2 [dev] model"
    tasks = ("txt2img", "edit")
    references = 10  # (BFL's limit for FLUX.2; they recommend at most 6 for [dev])
    distilled_guidance = True
    refused = DIT_REFUSED | {
        "clip_skip": "its prompts are read by Mistral Small 3.1, not CLIP",
        "controlnets": "diffusers has no FLUX.2 ControlNet pipeline",
        "negative_prompt": "its guidance is embedded (distilled): Flux2Pipeline takes no negative prompt",
        "true_cfg_scale": "Flux2Pipeline has no true classifier-free guidance",
    }
    pipelines = {"txt2img": "Flux2Pipeline", "edit": "Flux2Pipeline"}

    def own_components(self, path: Path) -> dict[str, Any]:
        """Its tokenizer without the processor around it (attached after: see ``attach``), where
        the model names Mistral's Pixtral processor, which transformers builds only with
        torchvision (not installed here); the pipeline applies its chat template to text alone,
        which the tokenizer does the same (the template saved beside it is the processor's)."""
        import json

        index = json.loads((path / "model_index.json").read_text())
        return {"tokenizer": None} if "Processor" in (index.get("tokenizer") or [None, ""])[1] else {}

    def attach(self, pipe: Any, path: Path) -> None:
        """The tokenizer, with the processor's chat template (saved as chat_template.jinja, or in
        the older chat_template.json), which is the one the pipeline would apply through it."""
        if pipe.tokenizer is None:
            import json

            from transformers import AutoTokenizer

            folder = path / "tokenizer"
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if (folder / "chat_template.jinja").is_file():
                tokenizer.chat_template = (folder / "chat_template.jinja").read_text()
            elif (folder / "chat_template.json").is_file():
                tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
            pipe.register_modules(tokenizer=tokenizer)


FLUX2_KLEIN = Flux2Klein()
FLUX2_DEV = Flux2Dev()

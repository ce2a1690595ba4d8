"""What a model family is to the worker: the one interface every family module fills in.

The engine, the parts a request adds, training and checkpoint conversion never compare family
names: they ask the model's family (``Loaded.family``, worked out once at load). A family is
one instance of a ``Family`` subclass, listed in ``worker/families/__init__.py``'s registry;
the defaults here are those of the UNet families (SD 1.x/2.x, SDXL), and a family says only
where it differs. docs/adding-a-family.md says how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserInputError

TASKS = ("txt2img", "img2img", "inpaint")
UNET_PARTS = "for SD 1.x, 2.x and XL models"
# What the DiT families with their own kind of latents and text encoders refuse, by field: the
# parts made here for a UNet and CLIP, and what is drawn for unpacked latents.
DIT_REFUSED = {
    "ip_adapter": f"IP-Adapters here are {UNET_PARTS}",
    "ip_adapters": f"IP-Adapters here are {UNET_PARTS}",
    "embeddings": f"textual-inversion embeddings here are {UNET_PARTS}",
    "tiling": f"seamless tiling needs a UNet ({UNET_PARTS[4:]})",
    "hires": f"the hires fix here is {UNET_PARTS} and SD3",
    "variation": "variation seeds are drawn here for unpacked latents (SD 1.x, 2.x, XL and SD3)",
}


def pipeline_defaults(pipeline: Any) -> dict:
    """The steps, guidance and (img2img, inpaint) strength diffusers' ``pipeline`` class takes
    when not given them: what a request that leaves them out gets, for the families that follow
    their pipelines' defaults."""
    import inspect

    own = inspect.signature(pipeline.__call__).parameters
    defaults = {"num_inference_steps": own["num_inference_steps"].default,
                "guidance_scale": own["guidance_scale"].default}
    return defaults | ({"strength": own["strength"].default} if "strength" in own else {})


@dataclass(frozen=True)
class ControlNetKind:
    """The ControlNets that steer a family's denoiser: their diffusers class, the config keys
    they must share with it, and which models they are for (as refusals name them)."""

    cls: str
    must_match: tuple[str, ...]
    models: str
    several: str  # the diffusers class that runs several at once
    single_file: bool = False  # one file in the original layout is read too (shaped after the denoiser)


class Family:
    name = ""  # as answers and logs name it: "SD3"
    kind = ""  # as refusals start: "an SD3 model"
    denoiser = "unet"  # the pipeline's attribute that denoises
    flow_matching = False  # its schedulers: flow-matching ones, or noise / v-prediction ones
    tasks = TASKS  # what a request's ``task`` may ask of it
    # Request fields it does not take, and why, said after "MODEL is KIND; ".
    refused: dict[str, str] = {}
    takes_refiner = False  # an SDXL refiner may take over its last steps
    refines = False  # it is a refiner: a request's ``refiner``, never its ``model``
    prompt_weighting = True  # long and weighted prompts encoded here (CLIP families)
    true_cfg = False  # takes true_cfg_scale: classifier-free guidance as a second pass (FLUX.1, Qwen-Image)
    distilled_guidance = False  # its guidance_scale is an embedded, distilled guidance (FLUX.1 [dev])
    # Its T5 text encoder and tokenizer, which ``model.t5: false`` leaves out (None: it has none).
    optional_t5: tuple[str, str] | None = None
    controlnet: ControlNetKind | None = None
    # What one file of its denoiser alone comes without (the configs' model lends them).
    file_lacks: tuple[str, ...] = ()
    references = 1  # edit: how many input images its edit pipeline takes at once
    # The step caches (``cache.method``) diffusers' hooks run on its denoiser, where it has them.
    caches = ("first_block", "taylorseer", "magcache", "faster")
    # Training: the pipeline class of the models it trains (base models: not inpainting ones,
    # nor refiners), and what its LoRAs wrap.
    training_pipeline: str | None = None
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    lora_layers = "unet_lora_layers"  # the name save_lora_weights takes the denoiser's layers by
    video_vae = False  # its VAE encodes and decodes frames (B, C, 1, H, W): Qwen-Image's
    quantizable = False  # QUANTIZE applies: a DiT denoiser, made of linear layers
    # COMPILE: a UNet, compiled whole (its repeated blocks are a small part of its work), its
    # attention's q, k, v run as one matmul, channels-last on CUDA.
    fuses_qkv = False
    cuda_precision = "fp16"  # what it runs in on CUDA when nobody says (MODEL_PRECISION, model.precision)
    checkpoint_lora_training = False  # gradient checkpointing for LoRAs too, on GPUs (FLUX.1's activations)

    # --- Recognising it ---

    def recognises(self, components: dict[str, str | None]) -> bool:
        """Whether a model with these components (name -> class name, as ``model_index.json``
        lists them, and its pipeline's class as ``_class_name``) is of this family."""
        raise NotImplementedError

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        """For a single-file checkpoint with these keys: the key of diffusers'
        ``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` whose configs describe it (or, where diffusers has
        none for its layout, the hub id of the model whose configs do), or None if not ours."""
        return None

    def checkpoint_lacks(self, keys: set[str], t5: bool) -> list[str]:
        """The components such a checkpoint may come without, which the model giving its
        configs supplies whole (``t5``: its T5 is wanted): a transformer file's ``file_lacks``."""
        return list(self.file_lacks) if self.file_lacks and self.checkpoint_reference(keys, False) else []

    def fit_reference_configs(self, pipeline: Any) -> None:
        """A checkpoint converted with its layout's reference configs (not the caller's):
        correct what the file's weights say differently."""

    def own_components(self, path: Path) -> dict[str, Any]:
        """Components of the model in ``path`` that diffusers' loader cannot build here by
        itself, loaded: passed to ``from_pretrained`` (Qwen-Image-Edit's processor)."""
        return {}

    def attach(self, pipe: Any, path: Path) -> None:
        """Components ``own_components`` left out (None), attached once diffusers loaded the rest
        (FLUX.2 [dev]'s tokenizer, which diffusers would check against a processor class)."""

    # --- What it makes, and what a request may ask of it ---

    def without_t5(self) -> dict[str, None]:
        """What from_pretrained leaves out for ``model.t5: false``."""
        return dict.fromkeys(self.optional_t5 or ())

    def denoiser_of(self, pipe: Any) -> Any:
        return getattr(pipe, self.denoiser)

    def multiple(self, pipe: Any) -> int:
        """What image sides must be a multiple of: the VAE's factor, times the patch size."""
        return pipe.vae_scale_factor

    def default_size(self, pipe: Any) -> int:
        """The side of the model's own images (512 for SD 1.5, 1024 for SDXL and SD3)."""
        return self.denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor

    def check(self, request: Any, model: str, pipe: Any) -> None:
        """Refuse, naming the field, what this model cannot do, before any work for it."""
        if request.task not in self.tasks:
            raise UserInputError("task", f"{model} is {self.kind}; it runs {', '.join(self.tasks)}, not {request.task}")
        multiple = self.multiple(pipe)
        for field in ("width", "height"):
            value = getattr(request, field)
            if value and value % multiple:
                raise UserInputError(field, f"must be a multiple of {multiple} for {model}, got {value}")
        if request.refiner and not self.takes_refiner:
            raise UserInputError("refiner", f"{model} is not an SDXL model: a refiner takes over from SDXL models")
        for field, why in self.refused.items():
            if getattr(request, field):
                raise UserInputError(field, f"{model} is {self.kind}; {why}")
        if request.cache and not hasattr(self.denoiser_of(pipe), "enable_cache"):
            raise UserInputError("cache", f"{model} is {self.kind}: its {type(self.denoiser_of(pipe)).__name__} has "
                                          "no diffusers cache hooks (FLUX.1's transformer has)")
        if len(request.images) > self.references:
            raise UserInputError("images", f"{model} is {self.kind}; its edits take "
                                           f"{'one image' if self.references == 1 else f'up to {self.references}'}, "
                                           f"got {len(request.images)}")
        if request.true_cfg_scale is not None and not self.true_cfg:
            raise UserInputError("true_cfg_scale", f"{model} is {self.kind}: its guidance_scale is real "
                                                   "classifier-free guidance already")

    def mag_ratios(self) -> Any:
        """MagCache's calibration for its denoiser (None: diffusers has none)."""
        return None

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """What a request for ``task`` (with ``controlnets`` or not) that leaves them out gets,
        where the family's pipelines differ from the request's own defaults (FLUX.1: its
        pipelines' steps, guidance, strength)."""
        return {}

    def read_a1111(self, request: Any, pipe: Any) -> Any:
        """An AUTOMATIC1111 payload's request as this family reads its fields (its ``cfg_scale``
        arrives as ``guidance_scale``, real CFG for most families)."""
        return request

    def call_options(self, request: Any, pipe: Any) -> dict:
        """Pipeline arguments of the family's own, for every pass of the job."""
        return {}

    def runs_true_cfg(self, request: Any) -> bool:
        """Whether its pipeline guides ``request`` with a second, unconditional pass a step (as
        diffusers decides: a ``negative_prompt`` and ``true_cfg_scale`` above 1)."""
        return self.true_cfg and request.negative_prompt is not None and (request.true_cfg_scale or 1) > 1

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        """The diffusers pipeline that runs ``task`` (with ``controlnets`` or not; diffusers'
        AutoPipeline mapping picks the family's own class, with ControlNets when given them)."""
        import diffusers

        return getattr(diffusers, {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
                                   "inpaint": "AutoPipelineForInpainting"}[task])

    def control_images_as(self, task: str) -> str:
        """The pipeline argument that takes the control images for ``task``."""
        return "control_image"

    def txt2img_size(self, width: int, height: int) -> dict:
        """Arguments besides width and height that make its txt2img pipeline draw at exactly
        that size ({}: none needed)."""
        return {}

    def edit_inputs(self, images: list, width: int, height: int, resize_mode: str) -> dict:
        """Its edit pipeline's arguments for these input images, answering at exactly ``width`` x
        ``height``: here (FLUX.1 Kontext) the one image, fitted to that size as ``resize_mode`` says."""
        from ..images import fit

        return {"image": fit(images[0], (width, height), resize_mode)} | self.edit_size(width, height)

    def check_reference(self, image: Any, field: str) -> None:
        """Refuse, naming ``field``, an input image of an edit its pipeline cannot take."""

    def edit_size(self, width: int, height: int) -> dict:
        """Size arguments that make its edit pipeline answer at exactly ``width`` x ``height``."""
        return {"width": width, "height": height}

    def img2img_size(self, width: int, height: int) -> dict:
        """Size arguments its img2img pipeline needs to keep the input's size ({}: it does)."""
        return {}

    def per_image(self, images: dict, count: int) -> dict:
        """The input images as its img2img / inpaint pipelines want them for ``count`` images."""
        return images

    def convolutional(self, pipe: Any) -> list:
        """What seamless tiling makes wrap around (nothing: refused for families without UNet)."""
        return []

    # --- Prompts ---

    def tokenizers(self, pipe: Any) -> list:
        """The tokenizers long prompts are cut into windows by, one per text-encoder slot
        (None where the model leaves a slot empty)."""
        return []

    def text_encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs that textual-inversion embeddings extend."""
        return []

    def encode_prompts(self, pipe: Any, windows: dict, count: int, clip_skip: int | None,
                       negative_given: bool) -> dict:
        """Pipeline keywords with both prompts' embeddings, from their token windows (see
        worker.prompts); only called where ``prompt_weighting``."""
        raise NotImplementedError

    def prompt_arguments(self, pipe: Any, prompt: str, negative: str | None) -> dict:
        """Its pipeline's arguments for the prompts as text (where they are not encoded here):
        the negative one where the pipeline takes it."""
        import inspect

        takes_negative = "negative_prompt" in inspect.signature(pipe.__call__).parameters
        return {"prompt": prompt, **({"negative_prompt": negative} if takes_negative else {})}

    def load_lora(self, pipe: Any, path: Any, name: str) -> None:
        """A LoRA file onto the pipeline's modules as the adapter ``name`` (diffusers' loader for
        the family reads its own layouts and kohya's)."""
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)

    # --- Training ---

    def check_train(self, spec: Any) -> None:
        """Refuse, naming the field, what training this family does not do."""

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """The denoiser's text conditioning for ``prompts``: states, and pooled text or None
        (encoded once per prompt when the text encoders are frozen)."""
        raise NotImplementedError

    def text_batch(self, encoded: list[tuple]) -> tuple:
        """Prompts encoded one by one (``train_text``), as one batch."""
        import torch

        states = torch.cat([e[0] for e in encoded])
        pooled = torch.cat([e[1] for e in encoded]) if encoded[0][1] is not None else None
        return states, pooled

    def latent_normalisation(self, pipe: Any) -> tuple[Any, Any]:
        """(shift, scale): its VAE's latents as the denoiser reads them are (latents - shift) *
        scale (SD3's and FLUX.1's VAEs shift them as well)."""
        return pipe.vae.config.get("shift_factor") or 0.0, pipe.vae.config.scaling_factor

    def noise_scheduler(self, pipe: Any) -> Any:
        """The scheduler that noises the training latents: DDPM's, or for flow matching the
        model's FlowMatchEuler with every timestep (its sigmas unshifted where it shifts them
        per image size, as diffusers' training scripts take them)."""
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        cls = FlowMatchEulerDiscreteScheduler if self.flow_matching else DDPMScheduler
        return cls.from_config(pipe.scheduler.config)

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """Its objective: (the denoiser's prediction, its target, the timesteps)."""
        raise NotImplementedError

    def unpacked(self, pipe: Any, latents: Any, resolution: int) -> Any:
        """Latents its pipeline returned (``output_type="latent"``) as the VAE decodes them."""
        return latents

    def lora_state(self, state: dict) -> dict:
        """A trained LoRA's peft state in the layout its diffusers loader reads."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(state)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

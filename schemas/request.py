"""The inference request (txt2img, img2img, inpaint), validated without torch. Its nested
options (output, outpaint, variation, hires) are in ``options``, the parts it adds to the model
in ``parts``, what every request shares in ``common``; ``parse.parse_request`` sends a job's
``input`` here, or to ``train`` / ``convert``.

Every field has a type, bounds and a description; unknown fields are errors. Limits the
operator sets (``MAX_PIXELS`` ...) arrive as ``Limits`` in the validation context, so the
schema stays free of environment reads:

    InferenceRequest.model_validate(job["input"], context={"limits": settings.limits})
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from .common import ImageSource, Limits, ModelSpec, Strict
from .options import CacheSpec, HiresSpec, OutpaintSpec, OutputSpec, VariationSpec
from .parts import ControlNetSpec, EmbeddingSpec, IpAdapterSpec, LoraSpec, RefinerSpec, VaeSpec
from .schedulers import canonical_scheduler

if TYPE_CHECKING:
    pass

Task = Literal["txt2img", "img2img", "inpaint", "edit", "train", "convert"]

# A JPEG's EXIF is one 64 KB segment and its metadata is UTF-16: room for the prompts, and
# about 2,700 characters for the rest of the parameters.
JPEG_METADATA_CHARS = 30_000


def merge_style(style: str, prompt: str) -> str:
    """A style applied to a prompt as AUTOMATIC1111 applies it: its ``{prompt}`` takes the
    prompt, else it follows the prompt after a comma."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


# AUTOMATIC1111's extra-network tags (<lora:name:0.8>): names of files in its web UI's folders.
_EXTRA_NETWORK = re.compile(r"<(?:lora|lyco|hypernet):[^>]{1,200}>", re.IGNORECASE)


class InferenceRequest(Strict):
    """txt2img, img2img or inpaint. `task` may be left out: `mask_image` means inpaint,
    `image` means img2img, neither means txt2img."""

    task: Task | None = Field(None, description="What to run; inferred from the images when absent (never "
                              "`edit`: instruction editing on a model made for it, FLUX.1 Kontext, FLUX.2 or "
                              "Qwen-Image-Edit, is asked by name).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Weights to run.")
    prompt: str = Field(..., max_length=20_000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=20_000, description="What to steer away from.")
    width: int | None = Field(
        None, ge=64, le=8192, description="Pixels, multiple of 8 (16 for the DiT families); default: the model's "
        "size (img2img: the image's).",
    )
    height: int | None = Field(
        None, ge=64, le=8192, description="Pixels, multiple of 8 (16 for the DiT families); default as `width`."
    )
    num_inference_steps: int = Field(
        25, ge=1, le=1000, description="Denoising steps (default 25, or the endpoint's cap; the DiT families: "
        "their pipelines' own, 28 for SD3 and FLUX.1 dev, 4 for schnell, 50 for FLUX.2, Z-Image, Qwen-Image "
        "and img2img on SD3; a distilled FLUX.2 [klein] wants 4)."
    )
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance; <= 1 turns it off (Z-Image: "
                                  "0 does, default 5; SD3: default 7). FLUX.1 dev: its embedded, distilled guidance "
                                  "(default 3.5; schnell has none). FLUX.2 [klein]: default 4, above 1 refused on "
                                  "distilled models; FLUX.2 [dev]: embedded, default 4. Qwen-Image refuses it: its "
                                  "guidance is true_cfg_scale.")
    true_cfg_scale: float | None = Field(
        None, ge=1, le=50, description="Real classifier-free guidance with `negative_prompt` (1: off), for FLUX.1 "
        "(default 1; its guidance_scale is a distilled one) and Qwen-Image (default 4); other families refuse it "
        "(their guidance_scale is real CFG)."
    )
    guidance_rescale: float = Field(
        0, ge=0, le=1, description="CFG rescale φ (0.7 is usual): pulls strongly guided images back from washed-out, "
        "over-saturated colours; v-prediction and zero-terminal-SNR models need it. Where diffusers has it: SD 1.x / "
        "2.x txt2img, and SDXL without ControlNets."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="img2img / inpaint: how much to change the image (default 0.8)."
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seed of the first image; image i uses seed + i. Random when absent."
    )
    num_images: int = Field(1, ge=1, le=64, description="Images to generate, each with its own seed.")
    image: ImageSource | None = Field(None, description="Input image: base64, `data:` URI or http(s) URL.")
    images: list[ImageSource] = Field(
        default_factory=list, max_length=10, description="edit: several reference images (instead of `image`), for "
        "models that take several (FLUX.2 [klein]: up to 4, [dev]: up to 10; Qwen-Image-Edit-Plus: up to 3, "
        "which its prompts call Picture 1, Picture 2 ...)."
    )
    mask_image: ImageSource | None = Field(
        None, description="Inpainting mask (white = repaint), same forms as `image`."
    )
    resize_mode: Literal["stretch", "crop", "fill"] = Field(
        "stretch", description="How an input or control image of another shape than the output takes its size: "
        "`stretch`ed (AUTOMATIC1111's Just resize), scaled and centre-`crop`ped (Crop and resize), or scaled to fit "
        "and `fill`ed out with its edges (Resize and fill)."
    )
    outpaint: OutpaintSpec | None = Field(
        None, description="inpaint past the image's edges: its canvas grown by these margins, which are masked and "
        "painted (no mask_image)."
    )
    mask_invert: bool = Field(
        False, description="inpaint: repaint the black of mask_image and keep the white (AUTOMATIC1111's "
        "'inpaint not masked')."
    )
    mask_blur: int = Field(
        4, ge=0, le=64, description="inpaint: pixels of blur on the mask's edge, where the repainted part fades into "
        "the kept image (AUTOMATIC1111's mask blur; 0: a hard edge)."
    )
    keep_unmasked: bool = Field(
        True, description="inpaint: the input image's own pixels outside the mask, blended through the blurred "
        "edge (as AUTOMATIC1111 does); false: the pipeline's image everywhere, its VAE round trip included."
    )
    padding_mask_crop: int | None = Field(
        None, ge=0, le=2048, description="inpaint only the masked area (AUTOMATIC1111's 'only masked'): the mask's "
        "box plus this many pixels of context, widened to the aspect of width x height, is repainted at width x "
        "height (default: the model's own size) and pasted back; the image keeps its size."
    )
    scheduler: str | None = Field(
        None, description="Scheduler name from the table (or its diffusers class name, or AUTOMATIC1111's sampler "
        "name: `DPM++ 2M Karras`, `Euler a` ...); flow-matching models (SD3, FLUX.1) take the FlowMatch ones only "
        "(`Euler` and `Heun` there are read as their FlowMatch twins, as Forge and ComfyUI read them), the others "
        "the rest; default: the model's."
    )
    schedule: Literal["karras", "exponential", "beta", "sgm_uniform", "simple"] | None = Field(
        None, description="How the steps' noise levels are spaced (AUTOMATIC1111's schedule type), for the "
        "scheduler or the model's own: `sgm_uniform` (or `simple`) for SDXL Turbo, Lightning and Hyper-SD; "
        "default: the scheduler's own."
    )
    safety_checker: bool | None = Field(
        None, description="Run the model's safety checker (default: when the model ships one)."
    )
    clip_skip: int | None = Field(
        None, ge=1, le=24, description="Text-encoder layers to skip from the end (1: the penultimate layer's output)."
    )
    prompt_weighting: bool = Field(
        True, description="Read AUTOMATIC1111's attention syntax in the prompts: (words:1.3), (words), [words], BREAK "
        "(SD 1.x, 2.x, XL; SD3 refuses it unless this is false)."
    )
    styles: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        [], max_length=16, description="Prompt styles this endpoint offers (STYLES_FILE, AUTOMATIC1111's styles.csv), "
        "applied in order as AUTOMATIC1111 applies them: a style's `{prompt}` takes the prompt, else the style is "
        "appended after a comma; the same for the negative prompt."
    )
    tiling: Literal[False, True, "x", "y"] = Field(
        False, description="Seamless tiling: the image wraps around, so copies laid side by side meet without a seam "
        "(textures, patterns). true: both ways (AUTOMATIC1111's Tiling); `x`: its left and right edges only; `y`: "
        "its top and bottom. SD 1.x, 2.x and XL models."
    )
    stream: bool = Field(False, description="Yield a progress event per step while working.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Image format and delivery.")
    loras: list[LoraSpec] = Field(
        default_factory=list, max_length=8, description="LoRAs applied for this request only, each with its scale."
    )
    embeddings: list[EmbeddingSpec] = Field(
        default_factory=list, max_length=16, description="Textual-inversion embeddings for this request only."
    )
    controlnets: list[ControlNetSpec] = Field(
        default_factory=list, max_length=4, description="ControlNets steering this request, each with its image."
    )
    hires: HiresSpec | None = Field(None, description="txt2img: a second, larger pass (AUTOMATIC1111's hires fix).")
    cache: CacheSpec | Literal[False] | None = Field(
        None, description="Lossy step caching for this request (diffusers' cache hooks: first_block, taylorseer, "
        "magcache, faster), for models whose denoiser has them (FLUX.1, Qwen-Image; FLUX.2: taylorseer); off "
        "again after the job. "
        "Absent: the endpoint's CACHE, if set; `false`: none."
    )
    variation: VariationSpec | None = Field(
        None, description="txt2img: variations of the seed's image, from its noise blended with a second seed's "
        "(AUTOMATIC1111's variation seed)."
    )
    ip_adapter: IpAdapterSpec | None = Field(
        None, description="An IP-Adapter: a reference image as part of the prompt (`ip_adapters` for several)."
    )
    ip_adapters: list[IpAdapterSpec] = Field(
        default_factory=list, max_length=4, description="Several IP-Adapters at once, each with its image and "
        "scale (a face and a style, say); they share the first one's image encoder."
    )
    refiner: RefinerSpec | None = Field(None, description="txt2img on SDXL: a refiner for the last steps.")
    vae: VaeSpec | None = Field(
        None, description="A VAE replacing the model's for this request (AUTOMATIC1111's SD VAE)."
    )
    train: dict[str, Any] | None = Field(None, description="Only with task 'train' (TrainRequest).")
    convert: dict[str, Any] | None = Field(None, description="Only with task 'convert' (ConvertRequest).")
    # Set when the job came as a docker-diffusers-api payload: answer in its shape too.
    _legacy: bool = PrivateAttr(False)
    # Set when it came as an AUTOMATIC1111 payload: that payload, without its images, to answer with.
    _a1111: dict | None = PrivateAttr(None)
    # The fields the caller left out, which take the defaults of the model's family.
    _left_out: frozenset[str] = PrivateAttr(frozenset())

    @property
    def legacy(self) -> bool:
        return self._legacy

    @property
    def a1111(self) -> dict | None:
        return self._a1111

    def left_out(self, name: str) -> bool:
        """Whether the caller left ``name`` out (the model's family may then fill it in)."""
        return name in self._left_out

    def reread(self, update: dict[str, Any], unsent: set[str]) -> InferenceRequest:
        """A copy with ``update`` as if the caller sent it and ``unsent`` as if left out (how a
        model's family reads a field of another API: AUTOMATIC1111's ``cfg_scale``)."""
        copy = self.model_copy(update=update)
        copy._left_out = (self._left_out - set(update)) | unsent
        return copy

    def references(self) -> list[tuple[str, str]]:
        """The input images of an edit, each with the field it answers for."""
        if self.image is not None:
            return [("image", self.image)]
        return [(f"images[{i}]", image) for i, image in enumerate(self.images)]

    def adapters(self) -> list[tuple[str, IpAdapterSpec]]:
        """The IP-Adapters, each with the field it answers for."""
        if self.ip_adapter:
            return [("ip_adapter", self.ip_adapter)]
        return [(f"ip_adapters[{i}]", spec) for i, spec in enumerate(self.ip_adapters)]

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return None if value is None else canonical_scheduler(value)

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_as_a1111_writes_it(cls, value: Any) -> Any:
        """AUTOMATIC1111 shows "Karras", "SGM Uniform": the same names."""
        return value.strip().lower().replace(" ", "_") if isinstance(value, str) else value

    @field_validator("tiling", mode="before")
    @classmethod
    def _tiling_as_json_writes_it(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value in ("x", "y")):
            raise ValueError(f'must be true, false, "x" or "y", got {value!r:.60}')
        return value

    @model_validator(mode="after")
    def _check_together(self, info: ValidationInfo) -> InferenceRequest:
        """Rules that involve several fields, in this order; each message names the fields it is about."""
        limits: Limits = (info.context or {}).get("limits") or Limits()
        self._left_out = frozenset(type(self).model_fields) - self.model_fields_set
        if "num_inference_steps" not in self.model_fields_set:
            self.num_inference_steps = min(self.num_inference_steps, limits.max_steps)
        self._check_one_task()
        if self.task is None:
            self.task = "inpaint" if self.mask_image or self.outpaint else "img2img" if self.image else "txt2img"
        self._check_task_inputs(limits)
        self._apply_styles(limits)
        self._check_prompts()
        self._check_masking()
        self._check_limits(limits)
        return self

    def _check_one_task(self) -> None:
        """The fields of one task only: no train or convert parts here, one form of IP-Adapter."""
        if self.train is not None:
            raise ValueError("train: only with task 'train'")
        if self.convert is not None:
            raise ValueError("convert: only with task 'convert'")
        if self.model.url and self.model.checkpoint_url and not self.model.url.startswith("s3://"):
            raise ValueError("model.url: with model.checkpoint_url, only an s3:// archive to publish it as")
        if self.ip_adapter and self.ip_adapters:
            raise ValueError("ip_adapters: send ip_adapter (one) or ip_adapters (several), not both")
        if self.task in ("train", "convert"):  # parse_request sends those to their own models
            raise ValueError(f"task: {self.task!r} needs its own fields (see TrainRequest, ConvertRequest)")

    def _check_task_inputs(self, limits: Limits) -> None:
        """What the task takes: images for img2img, inpainting and editing, hires and the refiner for txt2img."""
        if self.images and self.task != "edit":
            raise ValueError(f"images: only with task 'edit' (several references for one edit), not {self.task!r}")
        if self.task == "txt2img":
            for name in ("image", "mask_image", "strength", "outpaint"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: not used by task 'txt2img' (send task 'img2img' or 'inpaint')")
            if self.hires is not None:
                steps = self.hires.steps or self.num_inference_steps
                if int(steps * self.hires.strength) < 1:
                    raise ValueError(f"hires.strength: {self.hires.strength} of {steps} steps runs no step")
                if self.width and self.height and self.hires.size(self.width, self.height) > limits.max_pixels:
                    raise ValueError(f"hires.scale: {self.width}x{self.height} times {self.hires.scale} is over "
                                     f"this endpoint's {limits.max_pixels} pixels")
            if self.hires is not None and self.refiner is not None:
                raise ValueError("refiner: not together with hires (run the refined image through img2img)")
        elif self.hires is not None or self.refiner is not None:
            raise ValueError(f"{'hires' if self.hires else 'refiner'}: only with task 'txt2img', not {self.task!r}")
        else:
            if self.task == "edit" and self.images and self.image is not None:
                raise ValueError("images: send image (one) or images (several references), not both")
            if self.image is None and not (self.task == "edit" and self.images):
                raise ValueError(f"image: required for task {self.task!r}" + (" (or images)" if self.task == "edit"
                                                                               else ""))
            if self.outpaint and self.task != "inpaint":
                raise ValueError(f"outpaint: only with task 'inpaint', not {self.task!r}")
            if self.outpaint and self.mask_image is not None:
                raise ValueError("mask_image: not with outpaint, which masks the margins it adds")
            if self.task == "inpaint" and self.mask_image is None and not self.outpaint:
                raise ValueError("mask_image: required for task 'inpaint' (or outpaint)")
            if self.task == "img2img" and self.mask_image is not None:
                raise ValueError("mask_image: not used by task 'img2img' (send task 'inpaint')")
            if self.task == "edit":  # the instruction is the prompt; the model keeps what it is not told to change
                for name in ("mask_image", "strength"):
                    if getattr(self, name) is not None:
                        raise ValueError(f"{name}: not used by task 'edit' (the prompt says what to change)")
                return
            if self.strength is None:
                self.strength = 0.8
            if int(self.num_inference_steps * self.strength) < 1:
                raise ValueError(
                    f"strength: {self.strength} x num_inference_steps {self.num_inference_steps} "
                    "leaves no denoising step; raise either"
                )

    def _apply_styles(self, limits: Limits) -> None:
        """The endpoint's styles (AUTOMATIC1111's) merged into the prompts, in order."""
        for i, name in enumerate(self.styles):
            if name not in limits.styles:
                offered = ", ".join(sorted(limits.styles)[:20]) or "none"
                raise ValueError(f"styles[{i}]: no style {name!r} on this endpoint (it has: {offered})")
            style, style_negative = limits.styles[name]
            self.prompt = merge_style(style, self.prompt)
            if style_negative or self.negative_prompt:
                self.negative_prompt = merge_style(style_negative, self.negative_prompt or "")
            if self.hires and self.hires.prompt:  # (as AUTOMATIC1111 styles its hires prompts)
                self.hires.prompt = merge_style(style, self.hires.prompt)
            if self.hires and self.hires.negative_prompt:
                self.hires.negative_prompt = merge_style(style_negative, self.hires.negative_prompt)

    def _check_prompts(self) -> None:
        """Variation seeds, AUTOMATIC1111's extra-network tags, and metadata that fits the format."""
        if self.variation is not None and self.task != "txt2img":
            raise ValueError(f"variation: only with task 'txt2img', not {self.task!r} (img2img and inpainting "
                             "draw their noise inside diffusers)")
        prompts = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        if self.hires:
            prompts.update({"hires.prompt": self.hires.prompt, "hires.negative_prompt": self.hires.negative_prompt})
        for name, text in prompts.items():
            tag = _EXTRA_NETWORK.search(text or "") if self.prompt_weighting else None
            if tag:
                raise ValueError(f"{name}: {tag.group(0)} is AUTOMATIC1111's tag for a file of its web UI; send "
                                 "loras with the LoRA's url or id instead (prompt_weighting false keeps it as text)")
        if self.output.metadata and self.output.format == "jpeg":
            units = sum(len((text or "").encode("utf-16-le")) // 2 for text in prompts.values())
            if units > JPEG_METADATA_CHARS:
                raise ValueError(f"output.metadata: the prompts ({units} characters) do not fit in a JPEG's 64 KB of "
                                 f"EXIF (at most {JPEG_METADATA_CHARS}); send output.format png or webp")

    def _check_masking(self) -> None:
        """Resizing and masking options only where there is an image or a mask."""
        if "resize_mode" in self.model_fields_set and self.task == "txt2img" and not self.controlnets:
            raise ValueError("resize_mode: no image to resize (txt2img without controlnets)")
        if self.mask_invert and self.outpaint:
            raise ValueError("mask_invert: not with outpaint, whose mask is the margins it adds")
        masking = {"mask_invert", "mask_blur", "keep_unmasked", "padding_mask_crop"} & self.model_fields_set
        if masking and self.task != "inpaint":
            raise ValueError(f"{sorted(masking)[0]}: only with task 'inpaint', not {self.task!r}")
        if self.padding_mask_crop is not None and not self.keep_unmasked:
            raise ValueError("keep_unmasked: with padding_mask_crop the image outside the masked area is always kept")

    def _check_limits(self, limits: Limits) -> None:
        """The endpoint's caps (MAX_STEPS, MAX_IMAGES, MAX_PIXELS)."""
        if self.num_inference_steps > limits.max_steps:
            raise ValueError(
                f"num_inference_steps: at most {limits.max_steps} on this endpoint, got {self.num_inference_steps}"
            )
        if self.hires and self.hires.steps and self.hires.steps > limits.max_steps:
            raise ValueError(f"hires.steps: at most {limits.max_steps} on this endpoint, got {self.hires.steps}")
        if self.num_images > limits.max_images:
            raise ValueError(f"num_images: at most {limits.max_images} on this endpoint, got {self.num_images}")
        if self.width and self.height and self.width * self.height > limits.max_pixels:
            raise ValueError(
                f"width x height: {self.width}x{self.height} is over this endpoint's "
                f"{limits.max_pixels} pixels"
            )

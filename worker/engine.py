"""The engine: runs one inference job on a warm pipeline.

``Engine`` is created once per process (lazily: importing it imports torch). It owns the
``ModelStore`` and runs one job at a time; per-job values arrive as arguments.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import replace
from typing import Any, Callable

import diffusers
import torch
import transformers
from diffusers import AutoPipelineForImage2Image
from PIL import ImageOps

from schemas import (
    ConvertRequest,
    HiresSpec,
    ImageOut,
    InferenceRequest,
    ModelInfo,
    ModelSpec,
    Progress,
    Result,
    TrainRequest,
    a1111_name,
)

from . import families
from .errors import JobCancelled, UserInputError, redact
from .images import encode_image, fit, load_image
from .inpainting import Inpainting, grow, prepare
from .models import ModelStore
from .outputs import Outbox
from .parts import embeddings, loras, prompts, seamless, variation
from .parts.controlnets import ControlNets
from .parts.ip_adapters import IpAdapters
from .parts.preprocess import Depth, Pose, canny
from .parts.schedulers import make_scheduler
from .parts.vaes import Vaes
from .settings import Settings
from .sources.destinations import check_writable, hub_names
from .sources.loading import check_t5
from .sources.locate import FETCHED_NOW
from .sources.publish import check_destination, export
from .sources.refs import EMBEDDED_ID, model_ref
from .sources.storage import Location, conventional_name, parse_location
from .timing import ms_since

log = logging.getLogger(__name__)

Emit = Callable[[Progress], None]


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is visible")
    return choice


class Engine:
    def __init__(self, settings: Settings):
        # Progress bars belong in a terminal, not in a worker's logs: progress goes to the caller.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.settings = settings
        self.device = pick_device(settings.device)
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.models = ModelStore(settings, self.device)
        self.controlnets = ControlNets(settings, self.models.disk)
        self.vaes = Vaes(settings, self.models.disk)
        self.ip_adapters = IpAdapters(settings)
        self.depth = Depth(settings, self.device)
        self.pose = Pose(settings, self.device)
        self._lock = threading.Lock()  # one job on the GPU at a time

    def warm_up(self) -> None:
        """Load the default model so the first job finds it in memory."""
        with self._lock:
            self.models.get(model_ref(ModelSpec(), self.settings, self.device), lambda _: None, {})

    def generate(self, request: InferenceRequest, emit: Emit, cancelled: Callable[[], bool],
                 outbox: Outbox | None = None) -> Result:
        """Run one inference job; with an ``outbox`` the images are uploaded, not inlined."""
        timings: dict[str, float] = {}
        with self._lock:
            # 1. The model: from memory when warm; and can it do what the request asks?
            ref = model_ref(request.model, self.settings, self.device)
            loaded, source = self.models.get(ref, emit, timings)
            family, base = loaded.family, loaded.pipeline
            family.check(request, _name(loaded), base)

            # 2. Input images (control images too), sized to what will be generated.
            start = time.perf_counter()
            multiple = family.multiple(base)
            images, inpainting = self._inputs(request, family, base)
            images.update(self._control_inputs(request, images, family, base, inpainting))
            if request.task != "txt2img" or request.controlnets:
                timings["inputs"] = ms_since(start)
            if request.hires:  # the first pass's size is needed to know the second's
                images.setdefault("width", family.default_size(base))
                images.setdefault("height", family.default_size(base))
                if request.hires.size(images["width"], images["height"], multiple) > self.settings.max_pixels:
                    raise UserInputError("hires.scale", f"{images['width']}x{images['height']} times "
                                         f"{request.hires.scale} is over this endpoint's "
                                         f"{self.settings.max_pixels} pixels")

            # 3. The pipeline for this task, sharing the loaded components, with its own scheduler
            #    (and this request's ControlNets and VAE, kept warm).
            nets = self.controlnets.get(request.controlnets, family, family.denoiser_of(base), emit, timings)
            vae = self.vaes.get(request.vae, base.vae, emit, timings) if request.vae else None
            pipe = self._task_pipeline(loaded, request, nets, vae)
            tiled = seamless.axes(request.tiling)
            self._vae_memory(pipe.vae, request.num_images, _vae_pixels(request, images, family, base), tiled)

            # 4. One generator per image, so each image's seed reproduces it alone.
            seeds = _seeds(request.seed, request.num_images)
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            variation_seeds = _variation_seeds(request)  # (none without variation)

            # 5. Exactly this request's LoRAs active; none: the plain model.
            loras.apply(loaded, pipe, request.loras, settings=self.settings, disk=self.models.disk, emit=emit,
                        timings=timings)

            # 6. Denoise with this request's embeddings, reporting every step and stopping if
            #    RunPod cancelled the job.
            def reporting(stage: str) -> Callable:
                def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
                    if cancelled():
                        where = "at step" if stage == "inference" else f"at {stage} step"
                        raise JobCancelled(f"{where} {step} of {pipeline.num_timesteps}")
                    emit(Progress(stage=stage, step=step + 1, total=pipeline.num_timesteps))
                    return tensors

                return on_step

            prompt, negative = _as_read(request, request.prompt, request.negative_prompt)
            # In batches of at most MAX_BATCH_SIZE images: GPU memory grows with the batch.
            size = self.settings.max_batch_size or len(generators)
            batches = [generators[i:i + size] for i in range(0, len(generators), size)]
            outputs = []
            with embeddings.added(pipe, family, request.embeddings, settings=self.settings, disk=self.models.disk,
                                  emit=emit, timings=timings), \
                    self.ip_adapters.applied(pipe, request.adapters(), emit, timings) as reference, \
                    seamless.wrapping(family.convolutional(pipe), tiled):
                texts = _texts(family, pipe, request, prompt, negative)
                hires_texts, hires = texts, request.hires
                if hires and (hires.prompt or hires.negative_prompt):  # the second pass's own prompts
                    hires_texts = _texts(family, pipe, request, *_as_read(
                        request, hires.prompt or request.prompt, hires.negative_prompt or request.negative_prompt))
                first_pass = self._first_pass(pipe, request)
                rescale = _rescaled(request, pipe)
                for b, batch in enumerate(batches):
                    common = dict(guidance_scale=request.guidance_scale, num_images_per_prompt=len(batch),
                                  generator=batch, **reference, **rescale)
                    start = time.perf_counter()
                    noise = {}
                    if variation_seeds:
                        noise["latents"] = variation.starting_noise(
                            pipe, family.denoiser_of(pipe), batch, variation_seeds[b * size:b * size + len(batch)],
                            request.variation.strength,
                            images.get("width") or family.default_size(base),
                            images.get("height") or family.default_size(base))
                    output = first_pass(**texts, **common, num_inference_steps=request.num_inference_steps,
                                        callback_on_step_end=reporting("inference"), **noise,
                                        **family.per_image(images, len(batch)))
                    _add_ms(timings, "inference", start)
                    if request.hires:
                        start = time.perf_counter()
                        output = self._hires(family, pipe, request.hires, output.images, images, **hires_texts,
                                             **common, callback_on_step_end=reporting("hires"),
                                             num_inference_steps=request.hires.steps or request.num_inference_steps)
                        _add_ms(timings, "hires", start)
                    outputs.append(output)

            # 7. The refiner, if any, takes over the last steps of every batch (the model above may
            #    leave the device: it has done its part for all of them).
            refined = None
            if request.refiner:
                for i, (batch, output) in enumerate(zip(batches, outputs)):
                    outputs[i], info = self._refine(request, prompt, negative, output.images, batch,
                                                    reporting("refiner"), emit, timings)
                    refined = refined or info  # where it came from for the first batch
            generated = [image for output in outputs for image in output.images]
            nsfw = [flag for output in outputs
                    for flag in (getattr(output, "nsfw_content_detected", None) or [None] * len(output.images))]

        # 8. Outside the lock (the GPU is free for the next job): inpainting's answer pasted
        #    together, the images encoded, then uploaded or inlined.
        start = time.perf_counter()
        if inpainting and request.keep_unmasked:
            generated = [inpainting.paste(image) for image in generated]
        fmt = request.output.format
        # A1111's Size is the first pass's with the hires fix, the masked area's with only masked.
        first_size = (images["width"], images["height"]) if request.hires or inpainting and inpainting.region else None
        variations = variation_seeds or [None] * len(seeds)
        encoded = [
            encode_image(image, fmt, request.output.quality,
                         request.output.metadata and _parameters(request, seed, first_size or image.size, ref.id,
                                                                 pipe.scheduler, other))
            for image, seed, other in zip(generated, seeds, variations)
        ]
        timings["encode"] = ms_since(start)
        out = [
            ImageOut(format=fmt, seed=seed, variation_seed=other, width=image.width, height=image.height, nsfw=flag)
            for image, seed, other, flag in zip(generated, seeds, variations, nsfw)
        ]
        if outbox is not None:
            start = time.perf_counter()
            for image, (url, link) in zip(out, outbox.put_all([(data, fmt) for data in encoded], emit)):
                image.url, image.presigned_url = url, link
            timings["upload"] = ms_since(start)
        else:
            size = sum((len(data) + 2) // 3 * 4 for data in encoded)
            if size > self.settings.max_result_bytes:
                raise UserInputError(
                    "output", f"the images come to {size / 2**20:.1f} MB of base64, over this endpoint's "
                    f"{self.settings.max_result_bytes / 2**20:.1f} MB result limit; ask for fewer or smaller "
                    "images, output.format jpeg / webp, or an output.upload_url"
                )
            for image, data in zip(out, encoded):
                image.base64 = base64.b64encode(data).decode("ascii")
        info = ModelInfo(
            id=ref.id, source=source, revision=ref.revision, precision=ref.precision, device=self.device
        )
        return Result(task=request.task, images=out, timings=timings, model=info, refiner=refined)

    def convert(self, request: ConvertRequest, emit: Emit, cancelled: Callable[[], bool],
                trusted: bool = False) -> Result:
        """Publish a model as a safetensors archive on S3 (task "convert"); ``trusted``: for the
        operator (``python -m worker.convert``), who may write anywhere but over an object."""
        timings: dict[str, float] = {}
        spec = request.convert
        ref = replace(model_ref(request.model, self.settings, self.device), precision=spec.precision)
        # 1. Where it goes: bare s3:// names it from the hub id and the precision (an SD3 model
        #    without T5 takes a --no-t5 name: ``lean``, None while not known). A request writes
        #    where the operator lets it, and a hub model's own name only from the hub itself.
        hub_id = None if ref.id.startswith(("/", "url:", "embedded:")) else ref.id
        suffix = ".tar.zst" if spec.compression == "zstd" else ".tar"
        from_hub = not (ref.url or ref.checkpoint_url or request.model.revision)

        def destination(lean: bool | None) -> Location:
            lean_name = conventional_name(hub_id, spec.precision, "", "--no-t5" + suffix) if lean and hub_id else None
            location = parse_location(spec.dest_url, "convert.dest_url", self.settings, hub_id, spec.precision,
                                      suffix, default_name=lean_name)
            if not trusted:
                check_writable(location, "convert.dest_url", self.settings,
                               publishes=hub_names(hub_id, spec.precision, suffix, from_hub=from_hub, lean=lean))
            return location

        location = destination(False if ref.t5 else None)
        # Whether it is taken is asked now, unless a bare name may still turn into the --no-t5 one.
        final = ref.t5 or not hub_id or location.name != conventional_name(hub_id, spec.precision, "", suffix)
        check_destination(location, self.settings, "convert.dest_url", taken=final)
        # 2. The source's weights on disk (fetched or converted if need be).
        emit = _stops_between_stages(emit, cancelled)
        start = time.perf_counter()
        with self._lock:
            path, source = self.models.locator.locate(ref, emit)
        if source in FETCHED_NOW:
            timings["download"] = ms_since(start)
        family = families.at(path)
        check_t5(ref, family)
        lean = not ref.t5 and bool(family and family.optional_t5)
        location = destination(lean)
        if not final:
            check_destination(location, self.settings, "convert.dest_url")
        # 3. Load on the CPU in the target precision, save as safetensors, pack, upload.
        with self.models.disk.staging() as staging:
            _, out = export(path, ref.variant, location, spec.precision, staging=staging, settings=self.settings,
                            field="convert.dest_url", emit=emit, timings=timings, t5=not lean)
        info = ModelInfo(id=ref.id, source=source, revision=ref.revision, precision=spec.precision, device="cpu")
        return Result(task="convert", convert=out, timings=timings, model=info)

    def train(self, request: TrainRequest, emit: Emit, cancelled: Callable[[], bool], job_id: str | None) -> Result:
        """Fine-tune a fresh copy of the model and publish the result (task "train")."""
        from .train import train

        timings: dict[str, float] = {}
        spec = request.train
        ref = model_ref(request.model, self.settings, self.device)
        suffix = ".safetensors" if spec.method == "lora" else ".tar.zst"
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id or time.strftime("%Y%m%d-%H%M%S"))[:128]
        location = parse_location(spec.dest_url, "train.dest_url", self.settings, None, spec.precision, suffix,
                                  default_name=f"{stem}-{spec.method}{suffix}")
        check_writable(location, "train.dest_url", self.settings)
        check_destination(location, self.settings, "train.dest_url")
        with self._lock, self.models.disk.staging() as staging:
            start = time.perf_counter()
            path, source = self.models.locator.locate(ref, emit)
            if source in FETCHED_NOW:
                timings["download"] = ms_since(start)
            self.models.clear_device()
            self.controlnets.clear()
            self.vaes.clear()
            self.ip_adapters.clear()
            self.depth.clear()
            self.pose.clear()
            out = train(spec, path, ref.variant, location, device=self.device, staging=staging,
                              settings=self.settings, emit=emit, cancelled=cancelled, timings=timings)
        info = ModelInfo(id=ref.id, source=source, revision=ref.revision, precision="fp32", device=self.device)
        return Result(task="train", train=out, timings=timings, model=info)

    def _inputs(self, request: InferenceRequest, family, base) -> tuple[dict, Inpainting | None]:
        """Pipeline arguments for the images and size ({} for txt2img without a size); for
        inpainting, also how its answer is pasted together."""
        if request.task == "txt2img":
            return {k: v for k, v in (("width", request.width), ("height", request.height)) if v}, None
        image = load_image(request.image, "image", self.settings)
        if request.task == "img2img":
            width, height = self._size_from(image, request, "image", family.multiple(base))
            args = {"image": fit(image, (width, height), request.resize_mode)}
            return args | {"strength": request.strength} | family.img2img_size(width, height), None
        if request.outpaint:
            (image, mask), field = grow(image, request.outpaint), "outpaint"
        else:
            mask, field = load_image(request.mask_image, "mask_image", self.settings, mode="L"), "image"
            if request.mask_invert:
                mask = ImageOps.invert(mask)
        if request.padding_mask_crop is None:
            width, height = self._size_from(image, request, field, family.multiple(base))
        else:  # the image keeps its size: this is the size its masked area is repainted at
            width, height = request.width or family.default_size(base), request.height or family.default_size(base)
        inpainting = prepare(image, mask, (width, height), request.mask_blur, request.padding_mask_crop,
                             request.resize_mode)
        args = {"image": inpainting.cut(inpainting.original), "mask_image": inpainting.cut(inpainting.mask),
                "strength": request.strength, "width": width, "height": height}
        return args, inpainting

    @staticmethod
    def _first_pass(pipe, request: InferenceRequest):
        """The pipeline of the first pass: ``pipe``; for a refiner, one that stops at its switch
        and hands over the latents; for the hires fix one that hands over its latents
        (``latent``) or its images unjudged (``lanczos``: the safety checker, if any, judges the
        final images only)."""
        hires = request.hires
        if request.refiner:
            return functools.partial(pipe, output_type="latent", denoising_end=request.refiner.switch)
        if hires is None:
            return pipe
        if hires.upscaler == "latent":
            return functools.partial(pipe, output_type="latent")
        if getattr(pipe, "safety_checker", None) is not None:
            return type(pipe).from_pipe(pipe, safety_checker=None, requires_safety_checker=False)
        return pipe

    @staticmethod
    def _hires(family, pipe, hires: HiresSpec, first, images: dict, **common):
        """AUTOMATIC1111's hires fix, second pass: the first pass's output upscaled, then img2img
        on it at ``hires.strength`` with the same prompts, generators and ControlNets."""
        from PIL import Image

        width, height = hires.final(images["width"], images["height"], family.multiple(pipe))
        if hires.upscaler == "latent":
            factor = pipe.vae_scale_factor
            upscaled = torch.nn.functional.interpolate(first, size=(height // factor, width // factor), mode="bilinear")
        else:
            upscaled = [image.resize((width, height), Image.LANCZOS) for image in first]
        controls = {k: v for k, v in images.items() if k.startswith("control")}
        if "controlnet_conditioning_scale" in images:  # txt2img took the control images as `image`
            control = images["image"]
            if isinstance(control, list):
                controls["control_image"] = [c.resize((width, height)) for c in control]
            else:
                controls["control_image"] = control.resize((width, height))
        second = AutoPipelineForImage2Image.from_pipe(pipe)
        second.set_progress_bar_config(disable=True)
        return second(**family.img2img_size(width, height), image=upscaled, strength=hires.strength, **controls,
                      **common)

    def _refine(self, request: InferenceRequest, prompt: str, negative: str | None, latents, generators,
                on_step: Callable, emit: Emit, timings: dict[str, float]) -> tuple[Any, ModelInfo]:
        """SDXL's ensemble of experts: the refiner denoises the last ``1 - switch`` of the steps
        from the model's latents, with the same prompts and generators."""
        spec = request.refiner
        ref = model_ref(spec, self.settings, self.device)
        loading: dict[str, float] = {}
        refiner, source = self.models.get(ref, emit, loading)
        for phase, ms in loading.items():  # (once: later batches find it in memory)
            timings[f"refiner_{phase}"] = ms
        if not (refiner.family.refines or refiner.family.takes_refiner):
            raise UserInputError("refiner.id", f"{ref.id} is not an SDXL model ({type(refiner.pipeline).__name__})")
        pipe = AutoPipelineForImage2Image.from_pipe(
            refiner.pipeline,
            scheduler=make_scheduler(request.scheduler, refiner.pipeline.scheduler, request.schedule,
                                     family=refiner.family))
        pipe.set_progress_bar_config(disable=True)
        loras.apply(refiner, pipe, [], settings=self.settings, disk=self.models.disk, emit=emit, timings={})
        pixels = latents.shape[-1] * latents.shape[-2] * pipe.vae_scale_factor**2
        tiled = seamless.axes(request.tiling)
        self._vae_memory(pipe.vae, request.num_images, pixels, tiled)
        start = time.perf_counter()
        with seamless.wrapping(refiner.family.convolutional(pipe), tiled):
            output = pipe(**_texts(refiner.family, pipe, request, prompt, negative), image=latents,
                          num_inference_steps=request.num_inference_steps, denoising_start=spec.switch,
                          guidance_scale=request.guidance_scale, num_images_per_prompt=len(generators),
                          generator=generators, callback_on_step_end=on_step, **_rescaled(request, pipe))
        _add_ms(timings, "refiner", start)
        return output, ModelInfo(id=ref.id, source=source, revision=ref.revision, precision=ref.precision,
                                 device=self.device)

    def _vae_memory(self, vae, images: int, pixels: int, seamless_axes: str) -> None:
        """A batch through the VAE one image at a time, large images in tiles, except for a
        seamless image, which must wrap around whole. (Set both ways each job: the VAE is shared
        with the warm model.)"""
        vae.use_slicing = images > 1
        vae.use_tiling = pixels > self.settings.vae_tiling_pixels and not seamless_axes

    def _size_from(self, image, request: InferenceRequest, field: str, multiple: int) -> tuple[int, int]:
        """Output size: as asked, else the input's, rounded down to the model's ``multiple``."""
        width = request.width or image.width // multiple * multiple
        height = request.height or image.height // multiple * multiple
        if width < 64 or height < 64:
            raise UserInputError(field, f"{image.width}x{image.height} is smaller than 64x64")
        if width * height > self.settings.max_pixels:
            raise UserInputError(
                field, f"{image.width}x{image.height} is over this endpoint's {self.settings.max_pixels} "
                "pixels; send width and height to resize it"
            )
        return width, height

    def _control_inputs(self, request: InferenceRequest, images: dict, family, base,
                        inpainting: Inpainting | None) -> dict:
        """Pipeline arguments for the ControlNets: their images at the output size (cut as the
        input is, for inpainting), and how each steers. txt2img takes its size from the first
        control image when the request gives none."""
        if not request.controlnets:
            return {}
        controls = [load_image(spec.image, f"controlnets[{i}].image", self.settings)
                    for i, spec in enumerate(request.controlnets)]
        if request.task == "txt2img":
            width, height = self._size_from(controls[0], request, "controlnets[0].image", family.multiple(base))
            size = {"width": width, "height": height}
        else:
            width, height = images["image"].size
            size = {}
        if inpainting:
            controls = [inpainting.cut(c) for c in controls]
        controls = [fit(c, (width, height), request.resize_mode) for c in controls]
        # Preprocessed at the output size, where the ControlNet sees them.
        for i, spec in enumerate(request.controlnets):
            if spec.preprocess == "canny":
                controls[i] = canny(controls[i], spec.low_threshold, spec.high_threshold)
            elif spec.preprocess == "depth":
                controls[i] = self.depth(controls[i], f"controlnets[{i}].preprocess")
            elif spec.preprocess == "openpose":
                controls[i] = self.pose(controls[i], f"controlnets[{i}].preprocess")

        def each(values: list):
            return values[0] if len(values) == 1 else values

        return size | {
            family.control_images_as(request.task): each(controls),
            "controlnet_conditioning_scale": each([spec.scale for spec in request.controlnets]),
            "control_guidance_start": each([spec.start for spec in request.controlnets]),
            "control_guidance_end": each([spec.end for spec in request.controlnets]),
        }

    def _task_pipeline(self, loaded, request: InferenceRequest, nets: list | None = None, vae=None):
        base, family = loaded.pipeline, loaded.family
        name = _name(loaded)
        scheduler = make_scheduler(request.scheduler, base.scheduler, request.schedule, family=family)
        trained = scheduler.config.get("num_train_timesteps", 1000)
        if request.num_inference_steps >= trained:
            # With SD's steps_offset, as many steps as training timesteps index past the end.
            raise UserInputError(
                "num_inference_steps",
                f"must be below {trained} for this model's scheduler, got {request.num_inference_steps}"
            )
        encoder = getattr(base, "text_encoder", None)
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if request.clip_skip and (layers is None or request.clip_skip >= layers):
            raise UserInputError("clip_skip", f"at most {(layers or 1) - 1} for {name}, got {request.clip_skip}")
        overrides: dict = {"scheduler": scheduler}
        if nets:
            import diffusers.models

            several = getattr(diffusers.models, family.controlnet.several)
            overrides["controlnet"] = nets[0] if len(nets) == 1 else several(nets)
        if vae is not None:
            overrides["vae"] = vae
        ships_checker = getattr(base, "safety_checker", None) is not None
        use_checker = self.settings.safety_checker if request.safety_checker is None else request.safety_checker
        if request.safety_checker and not ships_checker:
            raise UserInputError("safety_checker", f"{name} ships no safety checker")
        if ships_checker and not use_checker:
            overrides.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = family.pipeline_class(request.task).from_pipe(base, **overrides)
        except ValueError:
            raise UserInputError("task", f"{name} ({type(base).__name__}) cannot run {request.task}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _name(loaded) -> str:
    return loaded.ref.id if loaded.ref.id != EMBEDDED_ID else "the embedded model"


def _as_read(request: InferenceRequest, prompt: str, negative: str | None) -> tuple[str, str | None]:
    """The prompts as the text encoder will read them (lower case when embeddings are in play)."""
    if request.embeddings:
        return embeddings.as_read(prompt), negative and embeddings.as_read(negative)
    return prompt, negative


def _rescaled(request: InferenceRequest, pipe) -> dict:
    """``guidance_rescale`` for every pass of the job (the hires pass too), or a refusal naming
    the diffusers pipeline that has none."""
    if not request.guidance_rescale:
        return {}
    for step in [pipe] + ([AutoPipelineForImage2Image.from_pipe(pipe)] if request.hires else []):
        if "guidance_rescale" not in inspect.signature(step.__call__).parameters:
            where = " (the hires pass)" if step is not pipe else ""
            raise UserInputError("guidance_rescale", f"diffusers' {type(step).__name__}{where} has none; it has it "
                                 "for SD 1.x / 2.x txt2img and SDXL without ControlNets")
    return {"guidance_rescale": request.guidance_rescale}


def _seeds(first: int | None, count: int) -> list[int]:
    """Image i's seed: ``first + i`` (a random ``first`` when none is given)."""
    first = first if first is not None else secrets.randbits(63)
    return [(first + i) % 2**63 for i in range(count)]


def _variation_seeds(request: InferenceRequest) -> list[int]:
    """Each image's variation seed, counted as seeds are; none without variation."""
    spec = request.variation
    return _seeds(spec.seed, request.num_images) if spec and spec.strength else []


def _add_ms(timings: dict[str, float], phase: str, start: float) -> None:
    """Count the time since ``start`` to ``phase`` (a phase may run once per batch)."""
    timings[phase] = round(timings.get(phase, 0.0) + ms_since(start), 1)


def _texts(family, pipe, request: InferenceRequest, prompt: str, negative: str | None) -> dict:
    """The pipeline's prompt arguments: embeddings for long or weighted prompts (encoded here),
    else the text itself, which the pipeline encodes as diffusers does."""
    return prompts.encoded(family, pipe, prompt, negative, request.clip_skip, request.prompt_weighting) or {
        "prompt": prompt, "negative_prompt": negative,
        **({"clip_skip": request.clip_skip} if request.clip_skip else {}),
    }


def _vae_pixels(request: InferenceRequest, images: dict, family, pipeline) -> int:
    """Pixels of the largest image the VAE handles in this job."""
    if "width" in images:
        width, height = images["width"], images["height"]
    elif request.task != "txt2img":
        width, height = images["image"].size
    else:
        width = height = family.default_size(pipeline)
    if request.hires:
        width, height = request.hires.final(width, height, family.multiple(pipeline))
    return width * height


def _parameters(request: InferenceRequest, seed: int, size: tuple[int, int], model_id: str, scheduler,
                variation_seed: int | None = None) -> str:
    """How an image was made, in AUTOMATIC1111's "parameters" layout, which image viewers and
    UIs parse: the prompt, the negative prompt, then "key: value" pairs."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    sampler, schedule = a1111_name(type(scheduler).__name__, scheduler.config)
    pairs = {"Steps": request.num_inference_steps, "Sampler": sampler}
    if schedule:
        pairs["Schedule type"] = schedule
    pairs["CFG scale"] = request.guidance_scale
    if request.guidance_rescale:  # as the CFG Rescale extension writes it
        pairs["CFG Rescale φ"] = request.guidance_rescale
    pairs.update({"Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model": model_id})
    if variation_seed is not None:
        pairs.update({"Variation seed": variation_seed, "Variation seed strength": request.variation.strength})
    if request.strength is not None:
        pairs["Denoising strength"] = request.strength
    if request.task == "inpaint":
        pairs["Mask blur"] = request.mask_blur
        if request.padding_mask_crop is not None:
            pairs.update({"Inpaint area": "Only masked", "Masked area padding": request.padding_mask_crop})
        if request.outpaint:
            grown = request.outpaint
            pairs["Outpaint"] = (f'"left {grown.left}, right {grown.right}, top {grown.top}, bottom {grown.bottom}, '
                                 f'fill {grown.fill}"')
    if request.hires:  # A1111's Size is then the first pass's
        pairs.update({"Denoising strength": request.hires.strength, "Hires upscale": request.hires.scale,
                      "Hires steps": request.hires.steps or request.num_inference_steps,
                      "Hires upscaler": "Latent" if request.hires.upscaler == "latent" else "Lanczos"})
        for key, own, main in (("Hires prompt", request.hires.prompt, request.prompt),
                               ("Hires negative prompt", request.hires.negative_prompt, request.negative_prompt)):
            if own and own != main:  # quoted, as A1111 writes them
                pairs[key] = json.dumps(own, ensure_ascii=False)
    if request.clip_skip:
        pairs["Clip skip"] = request.clip_skip + 1  # A1111 counts the last layer as 1
    if request.tiling:  # A1111 writes "Tiling: True"; one axis is this worker's own
        pairs["Tiling"] = True if request.tiling is True else request.tiling
    if request.loras:
        pairs["LoRAs"] = "; ".join(f"{redact(lora.url or lora.id)}:{lora.scale}" for lora in request.loras)
    for i, net in enumerate(request.controlnets):  # quoted, as AUTOMATIC1111's ControlNet writes them
        module = f"Module: {net.preprocess}, " if net.preprocess else ""
        pairs[f"ControlNet {i}"] = (f'"{module}Model: {redact(net.url or net.id)}, Weight: {net.scale}, '
                                    f'Guidance Start: {net.start}, Guidance End: {net.end}"')
    if request.adapters():
        pairs["IP-Adapter"] = "; ".join(f"{spec.id}/{spec.weight_name}:{spec.scale}" for _, spec in request.adapters())
    if request.vae:
        pairs["VAE"] = redact(request.vae.url or request.vae.id)
    if request.refiner:
        refiner = request.refiner
        pairs["Refiner"] = redact(refiner.id or refiner.url or refiner.checkpoint_url)
        pairs["Refiner switch at"] = refiner.switch
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def _stops_between_stages(emit: Emit, cancelled: Callable[[], bool]) -> Emit:
    """``emit`` that raises JobCancelled when a stage starts (its step-0 event) after RunPod
    cancelled the job: long jobs made of stages stop at the next one."""

    def checked(event: Progress) -> None:
        if event.step == 0 and cancelled():
            raise JobCancelled(f"before {event.stage}")
        emit(event)

    return checked


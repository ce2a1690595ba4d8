"""The engine: runs one job on a warm pipeline.

``Engine`` is created once per process (lazily: importing it imports torch). It owns the warm
state (the ``ModelStore``, the parts' caches, the preprocessors) and runs one job at a time;
per-job values arrive as arguments, and an inference job's decisions travel in its ``Plan``.
``generate`` reads top to bottom like a diffusers pipeline's ``__call__``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from typing import Any, Callable

import diffusers
import torch
import transformers
from diffusers import AutoPipelineForImage2Image

from schemas import ConvertRequest, ImageOut, InferenceRequest, ModelInfo, ModelSpec, Progress, Result, TrainRequest

from . import families, infotext, pipelines
from .errors import JobCancelled, UserInputError
from .images import encode_image
from .inputs import Inputs, vae_pixels
from .models import Loaded, ModelStore
from .outputs import Outbox, deliver
from .parts import caching, compiling, embeddings, loras, prompts, seamless, variation
from .parts.controlnets import ControlNets
from .parts.ip_adapters import IpAdapters
from .parts.schedulers import make_scheduler
from .parts.vaes import Vaes
from .plan import Plan
from .settings import Settings
from .sources import fetches
from .sources.destinations import check_writable, hub_names
from .sources.loading import check_t5
from .sources.locate import FETCHED_NOW
from .sources.publish import check_destination, export
from .sources.refs import model_ref
from .sources.storage import Location, conventional_name, parse_location
from .timing import ms_since

Emit = Callable[[Progress], None]
log = logging.getLogger(__name__)


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
        self.inputs = Inputs(settings, self.device)
        self._lock = threading.Lock()  # one job on the GPU at a time
        fetches.started()  # the heavy imports are done: archives fetch on threads now

    def warm_up(self) -> None:
        """Load the default model so the first job finds it in memory; with COMPILE, draw an image
        of its own size too, so the first job finds that shape compiled (the kernels read from
        MODELS_DIR/compile if an earlier worker compiled them)."""
        with self._lock:
            loaded, _ = self.models.get(model_ref(ModelSpec(), self.settings, self.device), lambda _: None, {})
        if mode := compiling.compiled(loaded.family.denoiser_of(loaded.pipeline)):
            start = time.perf_counter()
            self.generate(InferenceRequest(prompt="warm-up", num_inference_steps=2), lambda _: None, lambda: False)
            log.info("COMPILE=%s: %s warmed up at its own size in %.1f s", mode, loaded.ref.id,
                     time.perf_counter() - start)

    def generate(self, request: InferenceRequest, emit: Emit, cancelled: Callable[[], bool],
                 outbox: Outbox | None = None) -> Result:
        """Run one inference job; with an ``outbox`` the images are uploaded, not inlined."""
        with self._lock:
            # 1. The model: from memory when warm; and can it do what the request asks?
            ref = model_ref(request.model, self.settings, self.device)
            timings: dict[str, float] = {}
            loaded, source = self.models.get(ref, emit, timings)
            plan = Plan(request, ref, loaded, source, timings)
            if request.a1111 is not None:
                request = plan.request = plan.family.read_a1111(request, plan.base)
            plan.family.check(request, plan.name, plan.base)
            request = plan.request = self._with_defaults(request, plan)

            # 2. Input images (control images too), sized to what will be generated.
            start = time.perf_counter()
            self.inputs.prepare(plan)
            if request.task != "txt2img" or request.controlnets:
                timings["inputs"] = ms_since(start)

            # 3. The pipeline for this task, sharing the loaded components, with its own scheduler
            #    (and this request's ControlNets and VAE, kept warm).
            nets = self.controlnets.get(request.controlnets, plan.family, plan.family.denoiser_of(plan.base), emit,
                                        timings)
            vae = self.vaes.get(request.vae, plan.base.vae, emit, timings) if request.vae else None
            plan.pipe = pipelines.for_task(plan, self.settings, nets, vae)
            self._vae_memory(plan.pipe.vae, request.num_images, vae_pixels(plan), seamless.axes(request.tiling))

            # 4. Exactly this request's LoRAs active; none: the plain model (with COMPILE, its
            #    fused attention projections where neither LoRAs nor IP-Adapters need them apart).
            compiling.fused(plan.family.denoiser_of(plan.base), not (request.loras or request.adapters()))
            loras.apply(loaded, plan.pipe, request.loras, settings=self.settings, disk=self.models.disk, emit=emit,
                        timings=timings)
            pipelines.offload(plan.pipe, self.settings.offload, self.device)  # (OFFLOAD: its hooks, after LoRAs)

            # 5. Denoise, batch by batch, with this request's embeddings and IP-Adapters,
            #    reporting every step and stopping if RunPod cancelled the job.
            batches = plan.batches(self.settings.max_batch_size)
            outputs = self._denoise(plan, batches, emit, cancelled)

            # 6. The refiner, if any, takes over the last steps of every batch (the model above may
            #    leave the device: it has done its part for all of them).
            refined = None
            if request.refiner:
                for i, ((generators, _), output) in enumerate(zip(batches, outputs)):
                    outputs[i], info = self._refine(plan, output.images, generators,
                                                    _reporting("refiner", emit, cancelled), emit)
                    refined = refined or info  # where it came from for the first batch

        # 7. Outside the lock (the GPU is free for the next job): the images encoded, with how
        #    they were made, then uploaded or inlined.
        images = self._answer(plan, outputs, outbox, emit)
        return Result(task=request.task, images=images, timings=timings, refiner=refined,
                      model=self._info(loaded, source, eager=bool(plan.cached and not plan.cached.compiled)),
                      cache=plan.cached and plan.cached.out())

    def _info(self, loaded: Loaded, source: str, eager: bool = False) -> ModelInfo:
        """Which model ran, from where, and how (precision, device, COMPILE, QUANTIZE); ``eager``:
        its step cache left the job's denoiser eager (worker/parts/compiling.py)."""
        ref = loaded.ref
        mode = None if eager else compiling.compiled(loaded.family.denoiser_of(loaded.pipeline))
        return ModelInfo(id=ref.id, source=source, revision=ref.revision, precision=loaded.precision,
                         device=self.device, compile=mode, quantize=loaded.quantized)

    def _with_defaults(self, request: InferenceRequest, plan: Plan) -> InferenceRequest:
        """The request with what it left out taken from the model's family, where the family's
        defaults differ (steps within this endpoint's cap)."""
        defaults = plan.family.defaults(plan.base, request.task, controlnets=bool(request.controlnets))
        defaults = {name: value for name, value in defaults.items() if request.left_out(name)}
        if "num_inference_steps" in defaults:
            defaults["num_inference_steps"] = min(defaults["num_inference_steps"], self.settings.max_steps)
        request = request.model_copy(update=defaults) if defaults else request
        cache = self.settings.cache  # the endpoint's step cache, where this model's denoiser takes it
        if cache and request.left_out("cache") and caching.supports(plan.family, plan.base, cache, request):
            request = request.model_copy(update={"cache": cache})
        return request

    def _denoise(self, plan: Plan, batches: list, emit: Emit, cancelled: Callable[[], bool]) -> list:
        """The first pass (and the hires fix's second) over each batch; their outputs."""
        request, family, pipe, timings = plan.request, plan.family, plan.pipe, plan.timings
        prompt, negative = _as_read(request, request.prompt, request.negative_prompt)
        outputs = []
        with embeddings.added(pipe, family, request.embeddings, settings=self.settings, disk=self.models.disk,
                              emit=emit, timings=timings), \
                self.ip_adapters.applied(pipe, request.adapters(), emit, timings) as reference, \
                seamless.wrapping(family.convolutional(pipe), seamless.axes(request.tiling)), \
                caching.applied(family.denoiser_of(pipe), request.cache or None, request, family, pipe) as plan.cached:
            texts = _texts(family, pipe, request, prompt, negative)
            hires_texts, hires = texts, request.hires
            if hires and (hires.prompt or hires.negative_prompt):  # the second pass's own prompts
                hires_texts = _texts(family, pipe, request, *_as_read(
                    request, hires.prompt or request.prompt, hires.negative_prompt or request.negative_prompt))
            first_pass = pipelines.first_pass(pipe, request)
            rescale = pipelines.rescaled(request, pipe)
            for generators, variation_seeds in batches:
                common = dict(guidance_scale=request.guidance_scale, num_images_per_prompt=len(generators),
                              generator=generators, **reference, **rescale, **family.call_options(request, pipe))
                start = time.perf_counter()
                noise = {}
                if variation_seeds:
                    noise["latents"] = variation.starting_noise(pipe, family.denoiser_of(pipe), generators,
                                                                variation_seeds, request.variation.strength,
                                                                *plan.size())
                output = first_pass(**texts, **common, num_inference_steps=request.num_inference_steps,
                                    callback_on_step_end=_reporting("inference", emit, cancelled), **noise,
                                    **family.per_image(plan.images, len(generators)))
                _add_ms(timings, "inference", start)
                if hires:
                    start = time.perf_counter()
                    output = pipelines.hires_pass(family, pipe, hires, output.images, plan.images, **hires_texts,
                                                  **common, callback_on_step_end=_reporting("hires", emit, cancelled),
                                                  num_inference_steps=hires.steps or request.num_inference_steps)
                    _add_ms(timings, "hires", start)
                outputs.append(output)
        return outputs

    def _answer(self, plan: Plan, outputs: list, outbox: Outbox | None, emit: Emit) -> list[ImageOut]:
        """Inpainting's answer pasted together, each image encoded (with AUTOMATIC1111's
        infotext if asked), then delivered."""
        request, inpainting, timings = plan.request, plan.inpainting, plan.timings
        start = time.perf_counter()
        generated = [image for output in outputs for image in output.images]
        nsfw = [flag for output in outputs
                for flag in (getattr(output, "nsfw_content_detected", None) or [None] * len(output.images))]
        if inpainting and request.keep_unmasked:
            generated = [inpainting.paste(image) for image in generated]
        fmt = request.output.format
        # A1111's Size is the first pass's with the hires fix, the masked area's with only masked.
        first_size = plan.size() if request.hires or inpainting and inpainting.region else None
        variations = plan.variation_seeds or [None] * len(plan.seeds)
        encoded = [
            encode_image(image, fmt, request.output.quality,
                         request.output.metadata and infotext.parameters(
                             request, seed, first_size or image.size, plan.ref.id, plan.pipe.scheduler, other,
                             distilled=plan.family.distilled_guidance))
            for image, seed, other in zip(generated, plan.seeds, variations)
        ]
        timings["encode"] = ms_since(start)
        images = [
            ImageOut(format=fmt, seed=seed, variation_seed=other, width=image.width, height=image.height, nsfw=flag)
            for image, seed, other, flag in zip(generated, plan.seeds, variations, nsfw)
        ]
        deliver(images, encoded, outbox, self.settings, emit, timings)
        return images

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
            self.models.clear_device()  # training takes the whole device
            for warm in (self.controlnets, self.vaes, self.ip_adapters, self.inputs):
                warm.clear()
            out = train(spec, path, ref.variant, location, device=self.device, staging=staging,
                        settings=self.settings, emit=emit, cancelled=cancelled, timings=timings)
        info = ModelInfo(id=ref.id, source=source, revision=ref.revision, precision="fp32", device=self.device)
        return Result(task="train", train=out, timings=timings, model=info)

    def _refine(self, plan: Plan, latents, generators, on_step: Callable, emit: Emit) -> tuple[Any, ModelInfo]:
        """SDXL's ensemble of experts: the refiner denoises the last ``1 - switch`` of the steps
        from the model's latents, with the same prompts and generators."""
        request, timings = plan.request, plan.timings
        prompt, negative = _as_read(request, request.prompt, request.negative_prompt)
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
        pipelines.offload(pipe, self.settings.offload, self.device)
        pixels = latents.shape[-1] * latents.shape[-2] * pipe.vae_scale_factor**2
        tiled = seamless.axes(request.tiling)
        self._vae_memory(pipe.vae, request.num_images, pixels, tiled)
        start = time.perf_counter()
        with seamless.wrapping(refiner.family.convolutional(pipe), tiled):
            output = pipe(**_texts(refiner.family, pipe, request, prompt, negative), image=latents,
                          num_inference_steps=request.num_inference_steps, denoising_start=spec.switch,
                          guidance_scale=request.guidance_scale, num_images_per_prompt=len(generators),
                          generator=generators, callback_on_step_end=on_step, **pipelines.rescaled(request, pipe))
        _add_ms(timings, "refiner", start)
        return output, self._info(refiner, source)

    def _vae_memory(self, vae, images: int, pixels: int, seamless_axes: str) -> None:
        """A batch through the VAE one image at a time, large images in tiles, except for a
        seamless image, which must wrap around whole. (Set both ways each job: the VAE is shared
        with the warm model.)"""
        vae.use_slicing = images > 1
        vae.use_tiling = pixels > self.settings.vae_tiling_pixels and not seamless_axes


def _reporting(stage: str, emit: Emit, cancelled: Callable[[], bool]) -> Callable:
    """A step callback that reports each step of ``stage`` and stops the job if RunPod cancelled it."""
    def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
        if cancelled():
            where = "at step" if stage == "inference" else f"at {stage} step"
            raise JobCancelled(f"{where} {step} of {pipeline.num_timesteps}")
        emit(Progress(stage=stage, step=step + 1, total=pipeline.num_timesteps))
        return tensors

    return on_step


def _as_read(request: InferenceRequest, prompt: str, negative: str | None) -> tuple[str, str | None]:
    """The prompts as the text encoder will read them (lower case when embeddings are in play)."""
    if request.embeddings:
        return embeddings.as_read(prompt), negative and embeddings.as_read(negative)
    return prompt, negative


def _add_ms(timings: dict[str, float], phase: str, start: float) -> None:
    """Count the time since ``start`` to ``phase`` (a phase may run once per batch)."""
    timings[phase] = round(timings.get(phase, 0.0) + ms_since(start), 1)


def _texts(family, pipe, request: InferenceRequest, prompt: str, negative: str | None) -> dict:
    """The pipeline's prompt arguments: embeddings for long or weighted prompts (encoded here),
    else the text itself, which the pipeline encodes as diffusers does."""
    return prompts.encoded(family, pipe, prompt, negative, request.clip_skip, request.prompt_weighting) or {
        **family.prompt_arguments(pipe, prompt, negative),
        **({"clip_skip": request.clip_skip} if request.clip_skip else {}),
    }


def _stops_between_stages(emit: Emit, cancelled: Callable[[], bool]) -> Emit:
    """``emit`` that raises JobCancelled when a stage starts (its step-0 event) after RunPod
    cancelled the job: long jobs made of stages stop at the next one."""

    def checked(event: Progress) -> None:
        if event.step == 0 and cancelled():
            raise JobCancelled(f"before {event.stage}")
        emit(event)

    return checked


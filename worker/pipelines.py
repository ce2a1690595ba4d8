"""The diffusers pipelines a job runs: the task's own, sharing the warm model's components;
the first pass as the hires fix or a refiner needs it; the hires fix's second pass."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image

from schemas import HiresSpec, InferenceRequest

from .errors import UserInputError
from .families import Family
from .parts.schedulers import make_scheduler
from .plan import Plan
from .settings import Settings


def for_task(plan: Plan, settings: Settings, nets: list, vae: Any) -> Any:
    """The pipeline for the request's task, sharing the loaded model's components, with a
    scheduler of its own, and this request's ControlNets (``nets``) and VAE if any."""
    request, base, family, name = plan.request, plan.base, plan.family, plan.name
    scheduler = make_scheduler(request.scheduler, base.scheduler, request.schedule, family=family)
    trained = scheduler.config.get("num_train_timesteps", 1000)
    if request.num_inference_steps >= trained:
        # With SD's steps_offset, as many steps as training timesteps index past the end.
        raise UserInputError(
            "num_inference_steps",
            f"must be below {trained} for this model's scheduler, got {request.num_inference_steps}"
        )
    if request.num_inference_steps == 1 and scheduler.config.get("shift_terminal"):
        # Its sigmas are stretched to end at shift_terminal: one step divides 0 by 0 (a black image).
        raise UserInputError("num_inference_steps", f"at least 2 for {name}'s scheduler, which ends its steps at "
                                                    f"shift_terminal {scheduler.config.shift_terminal}")
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
    use_checker = settings.safety_checker if request.safety_checker is None else request.safety_checker
    if request.safety_checker and not ships_checker:
        raise UserInputError("safety_checker", f"{name} ships no safety checker")
    if ships_checker and not use_checker:
        overrides.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = share(family.pipeline_class(request.task, controlnets=bool(nets)), base, **overrides)
    except (ValueError, TypeError):
        raise UserInputError("task", f"{name} ({type(base).__name__}) cannot run {request.task}") from None
    pipe.set_progress_bar_config(disable=True)
    if settings.offload != "none":
        pipe.remove_all_hooks()  # the last job's offload hooks (on the shared modules): LoRAs load without them
    for field in ("negative_prompt", "true_cfg_scale"):  # (FLUX.1's ControlNet img2img / inpaint have neither)
        if getattr(request, field) and not (takes(pipe, field) or takes(pipe, f"{field}_embeds")):
            raise UserInputError(field, f"diffusers' {type(pipe).__name__}, which runs this request, takes none")
    sent_cfg = not request.left_out("true_cfg_scale")  # (Qwen-Image's default 4 runs without one, as in diffusers)
    if sent_cfg and request.true_cfg_scale not in (None, 1) and request.negative_prompt is None:
        raise UserInputError("true_cfg_scale", "acts only with a negative_prompt, as diffusers runs it (\"\" or \" \" "
                                               "is enough)")
    return pipe


def offload(pipe: Any, mode: str, device: str) -> None:
    """OFFLOAD: the job's pipeline (ControlNets included) moves the weights to ``device`` as it
    runs them: a component at a time (``model``: diffusers' model CPU offload), or a layer at a
    time (``sequential``: diffusers' leaf-level group offloading, which on CUDA copies the next
    layer on a side stream while this one runs; accelerate's sequential offload fails with
    torch 2.13)."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_group_offload(onload_device=torch.device(device), offload_type="leaf_level",
                                  use_stream=device == "cuda")


def takes(pipe: Any, argument: str) -> bool:
    """Whether the pipeline's call takes ``argument``."""
    return argument in inspect.signature(pipe.__call__).parameters


def share(cls: Any, base: Any, **overrides) -> Any:
    """A ``cls`` pipeline on ``base``'s components, ``overrides`` replacing some: diffusers'
    ``from_pipe`` without its cast of every shared module to one dtype (fp32 unless told, which
    would upcast a warm bf16 / fp16 model in place; quantized modules refuse any cast). The
    AutoPipeline classes build theirs without one."""
    if not hasattr(cls, "_get_signature_keys"):  # an AutoPipeline: it picks the class, and does not cast
        return cls.from_pipe(base, **overrides)
    modules, options = cls._get_signature_keys(cls)
    arguments = {k: v for k, v in base.components.items() if k in modules}
    arguments |= {k: base.config[k] for k in options if k in base.config}
    return cls(**arguments | overrides)


def first_pass(pipe: Any, request: InferenceRequest) -> Any:
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
        return share(type(pipe), pipe, safety_checker=None, requires_safety_checker=False)
    return pipe


def hires_pass(family: Family, pipe: Any, hires: HiresSpec, first: Any, images: dict, **common) -> Any:
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


def rescaled(request: InferenceRequest, pipe: Any) -> dict:
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

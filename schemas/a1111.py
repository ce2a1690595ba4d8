"""AUTOMATIC1111 API payloads (``/sdapi/v1/txt2img`` and ``/img2img``), as RunPod's official
worker-a1111 takes them: the job's input is the payload itself.

A payload is told apart by a field only AUTOMATIC1111 has (``steps``, ``cfg_scale``,
``sampler_name`` ...), translated to this worker's request, and answered in AUTOMATIC1111's
shape too: ``images`` as base64 strings, ``parameters`` (the payload, without its images) and
``info`` (a JSON string: seeds, sizes and each image's infotext), as clients written for that
API read them. Errors name the field as the client sent it (``steps: ...``). What this worker
cannot do (face restoration, scripts, extensions other than ControlNet) is
refused by name, not ignored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from .compat import RequestError
from .errors import describe_validation_error, renamed

# Fields only AUTOMATIC1111's payloads have: one of them makes a payload A1111's.
_OWN = {
    "steps", "cfg_scale", "sampler_name", "sampler_index", "batch_size", "n_iter",
    "denoising_strength", "init_images", "mask", "override_settings", "override_settings_restore_afterwards",
    "alwayson_scripts", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "restore_faces",
    "inpaint_full_res", "inpaint_full_res_padding", "inpainting_fill", "inpainting_mask_invert",
    "refiner_checkpoint", "refiner_switch_at", "send_images", "save_images", "script_name", "script_args",
    "subseed", "subseed_strength", "do_not_save_samples", "do_not_save_grid", "distilled_cfg_scale",
}
# Same meaning (A1111's -> ours).
_SAME = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
         "steps": "num_inference_steps", "cfg_scale": "guidance_scale", "tiling": "tiling",
         "styles": "styles"}
# Read below, with the fields they go with.
_HANDLED = {"seed", "batch_size", "n_iter", "sampler_name", "scheduler", "init_images", "mask", "mask_blur",
            "inpainting_mask_invert",
            "denoising_strength", "resize_mode", "inpaint_full_res", "inpaint_full_res_padding", "enable_hr",
            "hr_scale", "hr_upscaler", "hr_second_pass_steps", "refiner_checkpoint", "refiner_switch_at",
            "override_settings", "alwayson_scripts", "subseed", "subseed_strength", "hr_resize_x", "hr_resize_y",
            "hr_prompt", "hr_negative_prompt", "distilled_cfg_scale"}
# Accepted when they ask for nothing: what they would ask for is not built here.
_ONLY_AS_DEFAULT = {
    "restore_faces": (False, None), "script_name": (None, ""),
    "script_args": ([], None),
    "inpainting_fill": (1, None),
    "hr_sampler_name": ("Use same sampler", "", None), "hr_scheduler": ("Use same scheduler", "", None),
    "hr_checkpoint_name": ("Use same checkpoint", "", None), "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None), "firstpass_image": (None, ""), "latent_mask": (None, ""),
    "image_cfg_scale": (None,), "initial_noise_multiplier": (1.0, None),
}
# This worker's own fields that an A1111 payload may carry too: what its web UI names by local
# file (LoRAs, IP-Adapters, the model) is named here by hub id, path or URL.
_OURS = {"loras", "ip_adapter", "ip_adapters", "model"}
# Options of the web UI's own that do not change an image served here, and its samplers' tuning
# (eta, s_*), which clients send with values of their own choosing (webuiapi: eta 1.0) and
# diffusers' schedulers here do not take: ignored, as the README says.
_IGNORED = {"send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "sampler_index",
            "override_settings_restore_afterwards", "eta", "s_churn", "s_tmax", "s_tmin", "s_noise",
            "disable_extra_networks", "comments", "force_task_id", "infotext", "include_init_images"}
_RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fill"}
# ControlNet 1.1 (lllyasviel's) by the name A1111's extension shows: its diffusers repo.
_CONTROLNET_NAME = re.compile(r"^(control_v11[a-z0-9]*_sd15[a-z0-9]*_[a-z_]+)(\s*\[[0-9a-f]+\])?$")
_MODULES = {"none": None, "canny": "canny", "depth_midas": "depth", "depth_anything": "depth",
            "depth_anything_v2": "depth", "depth_zoe": "depth", "depth_leres": "depth", "openpose": "openpose"}


def is_a1111(data: Any) -> bool:
    return isinstance(data, dict) and bool(_OWN & data.keys()) and "task" not in data


def from_a1111(data: dict) -> dict:
    """This worker's request for an AUTOMATIC1111 payload."""
    request: dict[str, Any] = {"output": {"metadata": True}}  # its images carry their infotext
    for key, value in data.items():
        if key in _SAME:
            request[_SAME[key]] = value
        elif key in _ONLY_AS_DEFAULT:
            if value not in _ONLY_AS_DEFAULT[key]:
                raise RequestError(f"{key}: not supported by this worker (send {_ONLY_AS_DEFAULT[key][0]!r})")
        elif key in _OURS:
            request[key] = value
        elif key not in _IGNORED and key not in _HANDLED:
            raise RequestError(f"{key}: not supported by this worker")
    _distilled(data, request)
    seed = data.get("seed", -1)
    if seed not in (-1, None):
        request["seed"] = seed
    if data.get("subseed_strength"):  # the variation seed (-1: random)
        subseed = data.get("subseed", -1)
        request["variation"] = {"strength": data["subseed_strength"]} | (
            {} if subseed in (-1, None) else {"seed": subseed})
    request["num_images"] = _count(data.get("batch_size", 1), "batch_size") * _count(data.get("n_iter", 1), "n_iter")
    sampler = data.get("sampler_name") or data.get("sampler_index")
    if sampler:
        request["scheduler"] = sampler
    schedule = data.get("scheduler")
    if schedule and str(schedule).lower() not in ("automatic", "uniform"):
        request["schedule"] = schedule
    _images(data, request)
    _hires(data, request)
    if data.get("refiner_checkpoint"):
        request["refiner"] = {"id": data["refiner_checkpoint"], "switch": data.get("refiner_switch_at", 0.8)}
    _override_settings(data.get("override_settings") or {}, request)
    _controlnets(data.get("alwayson_scripts") or {}, request)
    return request


def _distilled(data: dict, request: dict) -> None:
    """Forge's FLUX payloads: ``distilled_cfg_scale`` is FLUX.1 [dev]'s embedded guidance (our
    ``guidance_scale``), and ``cfg_scale`` beside it real CFG (our ``true_cfg_scale``; 1: off)."""
    if "distilled_cfg_scale" not in data:
        return
    request["guidance_scale"] = data["distilled_cfg_scale"]
    cfg = data.get("cfg_scale", 1)
    if cfg != 1:
        request["true_cfg_scale"] = cfg
        request.setdefault("negative_prompt", "")  # (Forge's CFG runs against an empty one)


def _count(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"{field}: must be a whole number of at least 1, got {value!r}")
    return value


def _images(data: dict, request: dict) -> None:
    """img2img's inputs: the first init image, the mask and how they are fitted."""
    images = data.get("init_images")
    if images is not None:
        if not isinstance(images, list) or len(images) != 1:
            raise RequestError("init_images: one image, as a list of one")
        request["image"] = images[0]
        if data.get("denoising_strength") is not None:
            request["strength"] = data["denoising_strength"]
    if data.get("mask") is not None:  # (its inpainting fields come in every img2img payload: read with a mask)
        request["mask_image"] = data["mask"]
        request["mask_blur"] = data.get("mask_blur", 4)
        if data.get("inpainting_mask_invert"):
            request["mask_invert"] = True
        if data.get("inpaint_full_res"):
            request["padding_mask_crop"] = data.get("inpaint_full_res_padding", 32)
    if "resize_mode" in data and images is not None:
        if not isinstance(data["resize_mode"], int) or data["resize_mode"] not in _RESIZE_MODES:
            raise RequestError(f"resize_mode: 0, 1 or 2 (just resize, crop and resize, resize and fill), got "
                               f"{data['resize_mode']!r}")
        request["resize_mode"] = _RESIZE_MODES[data["resize_mode"]]


def _hires(data: dict, request: dict) -> None:
    if not data.get("enable_hr"):
        return
    upscaler = str(data.get("hr_upscaler") or "Latent")
    if not (upscaler.startswith("Latent") or upscaler == "Lanczos"):
        raise RequestError(f"hr_upscaler: Latent or Lanczos here, got {upscaler!r}")
    hires = {"scale": _resize_scale(data) or data.get("hr_scale", 2.0),
             "upscaler": "latent" if upscaler.startswith("Latent") else "lanczos"}
    for field in ("hr_prompt", "hr_negative_prompt"):  # empty: the first pass's, as here
        if data.get(field) not in ("", None, data.get(field.removeprefix("hr_"))):
            hires[field.removeprefix("hr_")] = data[field]
    if data.get("hr_second_pass_steps"):
        hires["steps"] = data["hr_second_pass_steps"]
    if data.get("denoising_strength") is not None:
        hires["strength"] = data["denoising_strength"]
    request["hires"] = hires


def _resize_scale(data: dict) -> float | None:
    """hr_resize_x / hr_resize_y (the second pass's size, instead of hr_scale) as a scale: one
    of them, or both in the first pass's shape (A1111 would crop to another shape)."""
    sides = {}
    for field in ("hr_resize_x", "hr_resize_y"):
        value = data.get(field) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RequestError(f"{field}: a whole number of pixels, got {value!r}")
        sides[field] = value
    x, y = sides.values()
    width, height = data.get("width") or 512, data.get("height") or 512  # (A1111's defaults)
    if not (x or y) or not all(isinstance(v, int) and v > 0 for v in (width, height)):
        return None  # (a bad width or height is refused by its own name)
    if x and y and x * height != y * width:
        raise RequestError(f"hr_resize_x: {x}x{y} is another shape than width x height ({width}x{height}); send "
                           "hr_scale, or only one of hr_resize_x and hr_resize_y")
    field, scale = ("hr_resize_x", x / width) if x else ("hr_resize_y", y / height)
    if not 1 < scale <= 4:
        raise RequestError(f"{field}: makes the second pass {scale:g} times the first's size; above 1 and at most 4")
    return scale


def _override_settings(settings: dict, request: dict) -> None:
    if not isinstance(settings, dict):
        raise RequestError("override_settings: must be a JSON object")
    for key, value in settings.items():
        if key == "CLIP_stop_at_last_layers":
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"override_settings.CLIP_stop_at_last_layers: a whole number from 1, got {value!r}")
            if value > 1:
                request["clip_skip"] = value - 1  # A1111 counts the last layer as 1
        elif key == "sd_vae":
            if value and value not in ("Automatic", "None"):
                request["vae"] = {"id": value}
        elif key == "sd_model_checkpoint":
            # A hub id or a path names a model; a web UI file name names the endpoint's own.
            named = isinstance(value, str) and (value.startswith("/") or re.fullmatch(r"[\w.-]+/[\w.-]+", value))
            if named and "model" not in request:
                request["model"] = {"id": value}
        else:
            raise RequestError(f"override_settings.{key}: not supported by this worker")


def _controlnets(scripts: dict, request: dict) -> None:
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts: must be a JSON object")
    for name in scripts:
        if name.lower() != "controlnet":
            raise RequestError(f"alwayson_scripts.{name}: not supported by this worker (ControlNet is)")
    section = scripts.get("controlnet") or scripts.get("ControlNet") or {}
    units = section.get("args", []) if isinstance(section, dict) else None
    if not isinstance(units, list):
        raise RequestError("alwayson_scripts.controlnet.args: must be a list of ControlNet units")
    nets = []
    for i, unit in enumerate(units):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise RequestError(f"{field}: must be a JSON object")
        if unit.get("enabled") is False:
            continue
        model = str(unit.get("model") or "")
        known = _CONTROLNET_NAME.match(model)
        module = str(unit.get("module") or "none")
        if module not in _MODULES:
            raise RequestError(f"{field}.module: {', '.join(_MODULES)} here, got {module!r}")
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
            image = image.get("image")
        net = {"id": f"lllyasviel/{known.group(1)}" if known else model, "image": image,
               "scale": unit.get("weight", 1.0), "start": unit.get("guidance_start", 0.0),
               "end": unit.get("guidance_end", 1.0)}
        if _MODULES[module]:
            net["preprocess"] = _MODULES[module]
        nets.append(net)
    if nets:
        request["controlnets"] = nets


def a1111_field(name: str) -> str:
    """The field an AUTOMATIC1111 client sent, for one of ours."""
    ours = {v: k for k, v in _SAME.items()} | {
        "num_images": "batch_size", "scheduler": "sampler_name", "schedule": "scheduler", "image": "init_images[0]",
        "mask_image": "mask", "mask_blur": "mask_blur", "mask_invert": "inpainting_mask_invert",
        "strength": "denoising_strength",
        "padding_mask_crop": "inpaint_full_res_padding",
        "hires.scale": "hr_scale", "hires.steps": "hr_second_pass_steps", "hires.strength": "denoising_strength",
        "hires.prompt": "hr_prompt", "hires.negative_prompt": "hr_negative_prompt",
        "refiner.id": "refiner_checkpoint", "refiner.switch": "refiner_switch_at",
        "clip_skip": "override_settings.CLIP_stop_at_last_layers", "vae.id": "override_settings.sd_vae",
        "model.id": "override_settings.sd_model_checkpoint",
        "variation": "subseed_strength", "variation.strength": "subseed_strength", "variation.seed": "subseed",
        "true_cfg_scale": "cfg_scale",  # (Forge's, beside distilled_cfg_scale)
    }
    if name in ours:
        return ours[name]
    match = re.match(r"controlnets\[(\d+)\]\.?(.*)", name)
    if match:
        theirs = {"id": "model", "scale": "weight", "start": "guidance_start", "end": "guidance_end"}
        rest = theirs.get(match.group(2), match.group(2))
        return f"alwayson_scripts.controlnet.args[{match.group(1)}]" + (f".{rest}" if rest else "")
    return name


def describe_a1111_error(exc: ValidationError) -> str:
    """Our validation message, told as an AUTOMATIC1111 client sent the request."""
    return a1111_message(describe_validation_error(exc))


# The numbers in a clip_skip message: a bound or the value sent.
_CLIP_NUMBER = re.compile(r"(at most |less than or equal to |greater than or equal to |, got )(-?\d+)")


def a1111_message(message: str) -> str:
    """An error message (``field: what`` parts) with the fields as an AUTOMATIC1111 client sent
    them, and CLIP layers counted its way: CLIP_stop_at_last_layers is clip_skip + 1."""
    parts = []
    for part in message.split("; "):
        if part.startswith("clip_skip: "):
            part = _CLIP_NUMBER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + 1}", part)
        parts.append(part)
    return renamed("; ".join(parts), a1111_field)


def echo(data: dict) -> dict:
    """The payload as AUTOMATIC1111 answers it back in ``parameters``, without its images."""
    return {k: None if k in ("init_images", "mask", "alwayson_scripts") else v for k, v in data.items()}


def a1111_answer(result: dict, payload: dict, infotexts: list[str]) -> dict:
    """The answer AUTOMATIC1111's API gives, from this worker's result (``type`` kept)."""
    import json

    images = result.get("images") or []
    seeds = [image["seed"] for image in images]
    # Without a variation, a subseed changes nothing: A1111 reports random ones, these the seeds.
    subseeds = [image.get("variation_seed", image["seed"]) for image in images]
    info = {
        "prompt": payload.get("prompt", ""), "all_prompts": [payload.get("prompt", "")] * len(images),
        "negative_prompt": payload.get("negative_prompt", ""), "seed": seeds[0] if seeds else None,
        "all_seeds": seeds, "subseed": subseeds[0] if subseeds else None, "all_subseeds": subseeds,
        "subseed_strength": payload.get("subseed_strength", 0), "width": images[0]["width"] if images else None,
        "height": images[0]["height"] if images else None, "sampler_name": payload.get("sampler_name"),
        "cfg_scale": payload.get("cfg_scale"), "steps": payload.get("steps"), "batch_size": len(images),
        "infotexts": infotexts,
    }
    return {"type": "result", "images": [image.get("base64") or image.get("url") for image in images],
            "parameters": payload, "info": json.dumps(info), "timings": result.get("timings", {})}

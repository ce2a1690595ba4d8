"""docker-diffusers-api payloads: ``{"callInputs": {...}, "modelInputs": {...}}`` (docs/compatibility.md).

Clients written for docker-diffusers-api keep working: their payload is translated to this
worker's request, and the answer carries that project's fields too (``image_base64`` or
``images_base64``, ``$timings``) next to the usual result. Errors name the field as the
client sent it (``modelInputs.num_images_per_prompt: ...``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .errors import describe_validation_error, renamed

# docker-diffusers-api's PIPELINE values (diffusers class names) -> task.
PIPELINE_TASKS = {
    "StableDiffusionPipeline": "txt2img",
    "StableDiffusionXLPipeline": "txt2img",
    "AutoPipelineForText2Image": "txt2img",
    "StableDiffusionImg2ImgPipeline": "img2img",
    "StableDiffusionXLImg2ImgPipeline": "img2img",
    "AutoPipelineForImage2Image": "img2img",
    "StableDiffusionInpaintPipeline": "inpaint",
    "StableDiffusionInpaintPipelineLegacy": "inpaint",
    "StableDiffusionXLInpaintPipeline": "inpaint",
    "AutoPipelineForInpainting": "inpaint",
    "StableDiffusion3Pipeline": "txt2img",
    "StableDiffusion3Img2ImgPipeline": "img2img",
    "StableDiffusion3InpaintPipeline": "inpaint",
}
MODEL_INPUTS = {  # theirs -> ours
    "prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image", "mask_image": "mask_image",
    "init_image": "image", "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale",
    "width": "width", "height": "height", "seed": "seed", "num_images_per_prompt": "num_images",
    "strength": "strength",
}
CALL_INPUTS_MODEL = {"MODEL_ID": "id", "MODEL_URL": "url", "MODEL_REVISION": "revision",
                     "MODEL_PRECISION": "precision", "CHECKPOINT_URL": "checkpoint_url"}
# Its dreambooth modelInputs -> ours, under `train` (callInputs.train: "dreambooth").
TRAIN_INPUTS = {
    "instance_prompt", "instance_images", "max_train_steps", "learning_rate", "resolution", "train_batch_size",
    "seed", "class_prompt", "num_class_images", "prior_loss_weight", "train_text_encoder",
    "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps",
}
# Its training options that this worker decides by itself (precision, memory savers).
IGNORED_TRAIN_INPUTS = {"mixed_precision", "gradient_checkpointing", "use_8bit_adam"}
# Options of docker-diffusers-api that this worker does by itself: accepted, nothing to do.
IGNORED_CALL_INPUTS = {"xformers_memory_efficient_attention", "startRequestId", "MODEL_VARIANT_FALLBACK"}


class RequestError(ValueError):
    """A request error whose message already names the field: ``field: what was wrong``."""


def is_legacy(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and set(data) <= {"callInputs", "modelInputs"}


def from_legacy(data: dict) -> dict:
    """This worker's request for a docker-diffusers-api payload."""
    call, inputs = data.get("callInputs") or {}, data.get("modelInputs") or {}
    for name, value in (("callInputs", call), ("modelInputs", inputs)):
        if not isinstance(value, dict):
            raise RequestError(f"{name}: must be a JSON object")
    if "train" in call:
        return _legacy_training(call, inputs)
    request: dict[str, Any] = {"prompt_weighting": False}  # it passed prompts to diffusers as they were
    for key, value in inputs.items():
        if key not in MODEL_INPUTS:
            raise RequestError(f"modelInputs.{key}: not supported by this worker")
        request[MODEL_INPUTS[key]] = value
    model: dict[str, Any] = {}
    for key, value in call.items():
        if key in CALL_INPUTS_MODEL:
            if key == "MODEL_PRECISION" and value == "":
                value = "fp32"  # docker-diffusers-api: "" means full precision
            if value is not None:
                model[CALL_INPUTS_MODEL[key]] = value
        elif key == "PIPELINE":
            if value not in PIPELINE_TASKS:
                raise RequestError(f"callInputs.PIPELINE: must be one of {', '.join(PIPELINE_TASKS)}, got {value!r}")
            request["task"] = PIPELINE_TASKS[value]
        elif key == "SCHEDULER":
            request["scheduler"] = value
        elif key == "safety_checker":
            request["safety_checker"] = value
        elif key == "dest_url":
            raise RequestError("callInputs.dest_url: only with callInputs.train")
        elif key not in IGNORED_CALL_INPUTS:
            raise RequestError(f"callInputs.{key}: not supported by this worker")
    if model:
        request["model"] = model
    if "mask_image" in request:  # its inpainting was diffusers' own: a hard mask, the VAE's pixels everywhere
        request.update(mask_blur=0, keep_unmasked=False)
    return request


def _legacy_training(call: dict, inputs: dict) -> dict:
    if call["train"] != "dreambooth":
        raise RequestError(f"callInputs.train: must be 'dreambooth', got {call['train']!r}")
    train: dict[str, Any] = {"method": "dreambooth"}
    if "dest_url" in call:
        train["dest_url"] = call["dest_url"]
    prior = inputs.get("with_prior_preservation", True)
    for key, value in inputs.items():
        if key in TRAIN_INPUTS:
            if prior or key not in ("class_prompt", "num_class_images", "prior_loss_weight"):
                train[key] = value
        elif key not in IGNORED_TRAIN_INPUTS and key != "with_prior_preservation":
            raise RequestError(f"modelInputs.{key}: not supported for training by this worker")
    request: dict[str, Any] = {"task": "train", "train": train}
    model = {CALL_INPUTS_MODEL[k]: ("fp32" if k == "MODEL_PRECISION" and v == "" else v)
             for k, v in call.items() if k in CALL_INPUTS_MODEL and v is not None}
    if model:
        request["model"] = model
    for key in call:
        if key not in CALL_INPUTS_MODEL and key not in IGNORED_CALL_INPUTS and key not in ("train", "dest_url"):
            raise RequestError(f"callInputs.{key}: not supported for training by this worker")
    return request


def legacy_field(name: str, sent: dict | None = None) -> str:
    """The field a docker-diffusers-api client sent (``sent``: its payload), for one of ours."""
    if name == "image" and isinstance(sent, dict) and "init_image" in (sent.get("modelInputs") or {}):
        return "modelInputs.init_image"
    if name.startswith("model."):
        theirs = {v: k for k, v in CALL_INPUTS_MODEL.items()}.get(name[6:])
        return f"callInputs.{theirs}" if theirs else name
    if name == "scheduler":
        return "callInputs.SCHEDULER"
    if name == "train.dest_url":
        return "callInputs.dest_url"
    if name.startswith("train."):
        return f"modelInputs.{name[6:]}"
    if name in ("task", "safety_checker"):
        return "callInputs.PIPELINE" if name == "task" else "callInputs.safety_checker"
    theirs = {v: k for k, v in MODEL_INPUTS.items() if k != "init_image"}.get(name)
    return f"modelInputs.{theirs}" if theirs else name


def describe_legacy_error(exc: ValidationError, sent: dict) -> str:
    """Our validation message with each leading field renamed as the client sent it."""
    return legacy_message(describe_validation_error(exc), sent)


def legacy_message(message: str, sent: dict) -> str:
    """An error about our fields (``model.id: ...``) as the client that sent ``sent`` reads it
    (``callInputs.MODEL_ID: ...``): validation's, and the engine's after it."""
    return renamed(message, lambda name: legacy_field(name, sent))

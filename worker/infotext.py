"""How an image was made, in AUTOMATIC1111's "parameters" layout (its infotext), which image
viewers, UIs and Civitai read from a PNG's text chunk or a JPEG's / WebP's EXIF comment."""

from __future__ import annotations

import json

from schemas import InferenceRequest, a1111_name

from .errors import redact


def parameters(request: InferenceRequest, seed: int, size: tuple[int, int], model_id: str, scheduler,
                variation_seed: int | None = None, distilled: bool = False) -> str:
    """How an image was made, in AUTOMATIC1111's "parameters" layout, which image viewers and
    UIs parse: the prompt, the negative prompt, then "key: value" pairs. ``distilled``: the
    model's guidance_scale is a distilled guidance (FLUX.1), written as Forge writes it."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    sampler, schedule = a1111_name(type(scheduler).__name__, scheduler.config)
    pairs = {"Steps": request.num_inference_steps, "Sampler": sampler}
    if schedule:
        pairs["Schedule type"] = schedule
    if distilled:  # Forge's: CFG scale is real CFG (1: off), beside the distilled one
        pairs["CFG scale"] = request.true_cfg_scale or 1
        pairs["Distilled CFG Scale"] = request.guidance_scale
    elif request.guidance_scale is None:  # (Qwen-Image: true_cfg_scale, which acts with a negative prompt)
        pairs["CFG scale"] = request.true_cfg_scale if request.negative_prompt is not None else 1
    else:
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

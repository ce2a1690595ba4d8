"""A training run's result, saved in its precision and published: a LoRA as one
``.safetensors`` file, a DreamBooth model as a ``.tar.zst`` archive of a diffusers directory."""

from __future__ import annotations

import hashlib
import time

from schemas import Progress

from ..precision import dtype as precision_dtype
from ..sources.publish import publish, upload
from ..timing import ms_since
from .data import text_encoders


def publish_lora(pipe, family, spec, location, staging, settings, emit, timings) -> tuple[str, int]:
    from peft import get_peft_model_state_dict

    start = time.perf_counter()
    emit(Progress(stage="save", step=0, total=1))
    dtype = precision_dtype(spec.precision)

    def layers(module) -> dict:
        state = family.lora_state(get_peft_model_state_dict(module))  # the layout its loader reads
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    extra = {}
    if spec.train_text_encoder:
        names = ("text_encoder_lora_layers", "text_encoder_2_lora_layers")
        extra = {name: layers(encoder) for name, encoder in zip(names, text_encoders(pipe))}
    type(pipe).save_lora_weights(staging, weight_name="lora.safetensors",
                                 **{family.lora_layers: layers(family.denoiser_of(pipe))}, **extra)
    path = staging / "lora.safetensors"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    emit(Progress(stage="save", step=1, total=1))
    timings["save"] = ms_since(start)
    start = time.perf_counter()
    upload(path, location, digest.hexdigest(), settings, "train.dest_url", emit)
    timings["upload"] = ms_since(start)
    return digest.hexdigest(), path.stat().st_size


def publish_model(pipe, family, spec, location, staging, settings, emit, timings) -> tuple[str, int]:
    start = time.perf_counter()
    emit(Progress(stage="save", step=0, total=1))
    family.denoiser_of(pipe).disable_gradient_checkpointing()
    for module in (family.denoiser_of(pipe), *text_encoders(pipe)):
        module.eval()
    pipe.to("cpu", precision_dtype(spec.precision))
    pipe.save_pretrained(staging / "model", safe_serialization=True)
    emit(Progress(stage="save", step=1, total=1))
    timings["save"] = ms_since(start)
    compression = "zstd" if location.name.endswith(".zst") else "none"
    out = publish(staging / "model", location, compression, spec.precision, staging=staging, settings=settings,
                  field="train.dest_url", emit=emit, timings=timings)
    return out.sha256, out.size_bytes

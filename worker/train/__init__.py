"""DreamBooth fine-tuning (``task: "train"``) of SD 1.x / 2.x, XL and 3, and LoRAs of FLUX.1,
shaped like diffusers' train_dreambooth(_lora)(_sdxl|_sd3|_flux).py.

``train()`` runs on the engine thread, which holds the GPU for the whole run:

1. The base model is loaded fresh from its files in fp32: training never touches the warm
   pipelines that inference jobs share.
2. Instance images are decoded, resized and center-cropped, and encoded once by the VAE (each
   step samples from the stored distribution, as encoding every step would); with
   ``random_flip`` their mirror images too. Each image trains with its caption, if it has one,
   else with ``instance_prompt``.
3. Prior preservation: the base model draws ``num_class_images`` of ``class_prompt`` first.
4. Trainable weights stay in fp32 (the master copy) whatever the model runs in; on CUDA the
   forward pass runs under autocast, bf16 where the GPU has it, else fp16 with a gradient
   scaler, and the frozen parts are cast to that dtype to save memory. fp32 trainable weights
   are what fix docker-diffusers-api's "Attempting to unscale FP16 gradients".
5. Each step: noise, a random timestep, the UNet's prediction (SDXL's also conditioned on
   both text encoders, the pooled text and the image size), MSE against the noise (or the
   velocity for v-prediction models); for SD3, a point on the straight path from latents to
   noise at a logit-normal timestep and its transformer's velocity
   (train_dreambooth_lora_sd3.py's recipe, without preconditioning); for FLUX.1 the same at a
   uniform timestep, on packed latents, with [dev]'s guidance embedding at 3.5
   (train_dreambooth_lora_flux.py's); plus the weighted prior loss; gradients clipped at 1.0,
   then AdamW under the chosen learning-rate schedule (gradient accumulation and Min-SNR
   weighting if asked). A progress event per step carries the loss; a cancelled job stops at
   the next step.
6. The result is saved in ``precision`` and published to ``dest_url``: a LoRA as one
   ``.safetensors`` file (usable at once in a request's ``loras``), a DreamBooth model as a
   ``.tar.zst`` archive of a diffusers directory (usable at once as ``model.url``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from schemas import Progress, TrainOut, TrainSpec

from .. import families
from ..errors import UserInputError
from ..images import load_image
from ..settings import Settings
from ..sources.loading import load_pipeline
from ..sources.storage import Location
from ..timing import ms_since
from . import data, loop, publishing


def train(spec: TrainSpec, model_dir: Path, variant: str | None, location: Location, *, device: str,
          staging: Path, settings: Settings, emit: Callable[[Progress], None], cancelled: Callable[[], bool],
          timings: dict[str, float]) -> TrainOut:
    # 1. The base model, fresh, in fp32.
    start = time.perf_counter()
    class_name = json.loads((model_dir / "model_index.json").read_text()).get("_class_name")
    family = families.at(model_dir)
    if family is None or class_name != family.training_pipeline:
        raise UserInputError("model.id", f"training supports {families.trained()} models, not {class_name}")
    family.check_train(spec)
    emit(Progress(stage="load", step=0, total=1))
    pipe = load_pipeline(model_dir, "fp32", variant, device)
    emit(Progress(stage="load", step=1, total=1))
    timings["load"] = ms_since(start)
    data.check_prompt_lengths(pipe, spec)
    autocast_dtype = loop.autocast_dtype(device)
    generator = torch.Generator("cpu").manual_seed(spec.seed)

    # 2. Instance latents, and 3. class latents for prior preservation.
    start = time.perf_counter()
    instance = data.latent_stats(pipe, family, (  # one full-size image in memory at a time
        load_image(source, f"train.instance_images[{i}]", settings) for i, source in enumerate(spec.instance_images)
    ), spec.resolution, mirrored=spec.random_flip)
    timings["inputs"] = ms_since(start)
    prior = None
    if spec.num_class_images:
        start = time.perf_counter()
        images = data.class_images(pipe, family, spec, device, autocast_dtype, emit, cancelled)
        prior = data.latent_stats(pipe, family, images, spec.resolution)
        timings["class_images"] = ms_since(start)

    # 4. What trains, in fp32; what does not, in the autocast dtype on CUDA.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(spec.seed)  # LoRA layers start random: the same seed, the same start
        params = loop.prepare(pipe, family, spec, autocast_dtype)
    frozen_text = not spec.train_text_encoder
    embeddings = {}
    if frozen_text:  # one encoding per prompt for the whole run
        with torch.no_grad():
            texts = {spec.instance_prompt, spec.class_prompt, *(spec.instance_captions or [])}
            embeddings = {text: family.train_text(pipe, [text]) for text in texts if text}

    # 5. The loop.
    start = time.perf_counter()
    losses = loop.fit(pipe, family, spec, params, instance, prior, embeddings, generator, device=device,
                      autocast_dtype=autocast_dtype, emit=emit, cancelled=cancelled)
    timings["train"] = ms_since(start)
    loop.free(device)

    # 6. Save and publish.
    if spec.method == "lora":
        sha256, size = publishing.publish_lora(pipe, family, spec, location, staging, settings, emit, timings)
    else:
        sha256, size = publishing.publish_model(pipe, family, spec, location, staging, settings, emit, timings)
    del pipe
    loop.free(device)
    return TrainOut(
        method=spec.method, url=location.url, sha256=sha256, size_bytes=size, precision=spec.precision,
        steps=spec.max_train_steps, loss=round(sum(losses) / len(losses), 6), instance_images=len(spec.instance_images),
        class_images=spec.num_class_images,
    )

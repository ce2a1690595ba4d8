"""DreamBooth fine-tuning (``task: "train"``) of SD 1.x / 2.x, XL and 3, shaped like diffusers'
train_dreambooth(_lora)(_sdxl|_sd3).py.

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
5. Each step: noise, a random timestep, the UNet's prediction (SDXL's also conditioned on both
   text encoders, the pooled text and the image size), MSE against the noise (or the velocity
   for v-prediction models); for SD3, a point on the straight path from latents to noise at a
   logit-normal timestep and its transformer's velocity (train_dreambooth_lora_sd3.py's
   recipe, without preconditioning); plus the weighted prior loss; gradients clipped at 1.0,
   then AdamW under the chosen learning-rate schedule (gradient accumulation and Min-SNR
   weighting if asked). A progress event per step carries the loss; a cancelled job stops at
   the next step.
6. The result is saved in ``precision`` and published to ``dest_url``: a LoRA as one
   ``.safetensors`` file (usable at once in a request's ``loras``), a DreamBooth model as a
   ``.tar.zst`` archive of a diffusers directory (usable at once as ``model.url``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from schemas import Progress, TrainOut, TrainSpec

from . import families
from .errors import JobCancelled, UserInputError
from .images import load_image
from .models import load_pipeline
from .precision import dtype as precision_dtype
from .settings import Settings
from .sources.publish import publish, upload
from .sources.storage import Location
from .timing import ms_since

log = logging.getLogger(__name__)

_TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_PROGRESS_INTERVAL_S = 0.1  # the contract: throttled only above about 10 events a second
_LOSS_WINDOW = 50
_VAE_BATCH = 4


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
    _check_prompt_lengths(pipe, spec)
    autocast_dtype = _autocast_dtype(device)
    generator = torch.Generator("cpu").manual_seed(spec.seed)

    # 2. Instance latents, and 3. class latents for prior preservation.
    start = time.perf_counter()
    instance = _latent_stats(pipe, (  # one full-size image in memory at a time
        load_image(source, f"train.instance_images[{i}]", settings) for i, source in enumerate(spec.instance_images)
    ), spec.resolution, mirrored=spec.random_flip)
    timings["inputs"] = ms_since(start)
    prior = None
    if spec.num_class_images:
        start = time.perf_counter()
        images = _class_images(pipe, spec, device, autocast_dtype, emit, cancelled)
        prior = _latent_stats(pipe, images, spec.resolution)
        timings["class_images"] = ms_since(start)

    # 4. What trains, in fp32; what does not, in the autocast dtype on CUDA.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(spec.seed)  # LoRA layers start random: the same seed, the same start
        params = _prepare(pipe, family, spec, autocast_dtype)
    frozen_text = not spec.train_text_encoder
    embeddings = {}
    if frozen_text:  # one encoding per prompt for the whole run
        with torch.no_grad():
            texts = {spec.instance_prompt, spec.class_prompt, *(spec.instance_captions or [])}
            embeddings = {text: family.train_text(pipe, [text]) for text in texts if text}

    # 5. The loop.
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=1e-2)
    lr_schedule = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=spec.lr_warmup_steps,
                                num_training_steps=spec.max_train_steps)
    scaler = torch.amp.GradScaler(device) if autocast_dtype == torch.float16 else None
    scheduler = family.noise_scheduler(pipe)
    losses: list[float] = []
    last_sent = 0.0
    for step in range(1, spec.max_train_steps + 1):
        if cancelled():
            raise JobCancelled(f"at training step {step - 1} of {spec.max_train_steps}")
        step_loss = 0.0
        for _ in range(spec.gradient_accumulation_steps):  # gradients add up over the micro-batches
            latents, chosen = _sample(instance, spec.train_batch_size, generator, pipe, mirrored=spec.random_flip)
            prompts = [spec.instance_captions[i] if spec.instance_captions else spec.instance_prompt for i in chosen]
            if prior is not None:
                latents = torch.cat([latents, _sample(prior, spec.train_batch_size, generator, pipe)[0]])
                prompts += [spec.class_prompt] * spec.train_batch_size
            with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                text = _batch([embeddings[p] for p in prompts]) if frozen_text else family.train_text(pipe, prompts)
                prior_weight = spec.prior_loss_weight if prior is not None else None
                loss = _loss(pipe, family, scheduler, latents, text, spec.resolution, generator, prior_weight,
                             spec.snr_gamma)
            if not math.isfinite(loss.item()):
                raise UserInputError("train.learning_rate", f"the loss became {loss.item()} at step {step}; lower it")
            loss = loss / spec.gradient_accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses = (losses + [step_loss])[-_LOSS_WINDOW:]
        now = time.monotonic()
        if now - last_sent >= _PROGRESS_INTERVAL_S or step == spec.max_train_steps:
            last_sent = now
            emit(Progress(stage="train", step=step, total=spec.max_train_steps, loss=round(losses[-1], 6)))
    timings["train"] = ms_since(start)
    del optimizer, lr_schedule, scaler
    _free(device)

    # 6. Save and publish.
    if spec.method == "lora":
        sha256, size = _publish_lora(pipe, family, spec, location, staging, settings, emit, timings)
    else:
        sha256, size = _publish_model(pipe, family, spec, location, staging, settings, emit, timings)
    del pipe
    _free(device)
    return TrainOut(
        method=spec.method, url=location.url, sha256=sha256, size_bytes=size, precision=spec.precision,
        steps=spec.max_train_steps, loss=round(sum(losses) / len(losses), 6), instance_images=len(spec.instance_images),
        class_images=spec.num_class_images,
    )




def _autocast_dtype(device: str) -> torch.dtype | None:
    if device != "cuda":
        return None  # CPU: plain fp32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _prepare(pipe, family, spec: TrainSpec, autocast_dtype: torch.dtype | None) -> list[torch.nn.Parameter]:
    """Mark what trains (fp32) and cast the rest; return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    encoders = _text_encoders(pipe)
    trained = family.denoiser_of(pipe)
    for module in (trained, pipe.vae, *encoders):
        module.requires_grad_(False)
    if spec.method == "lora":
        if autocast_dtype is not None:  # frozen base weights in half; the adapters stay fp32
            for module in (trained, *encoders):
                module.to(dtype=autocast_dtype)
        config = dict(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian")
        trained.add_adapter(LoraConfig(target_modules=list(family.lora_targets), **config))
        if spec.train_text_encoder:
            # transformers 5's own add_adapter wants peft >= 0.22; peft's injection works with 0.21.
            for encoder in encoders:
                inject_adapter_in_model(LoraConfig(target_modules=_TEXT_LORA_TARGETS, **config), encoder)
        modules = [trained] + (encoders if spec.train_text_encoder else [])
        params = [p for m in modules for n, p in m.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
    else:
        trained.requires_grad_(True)
        params = list(trained.parameters())
        for encoder in encoders:
            if spec.train_text_encoder:
                encoder.requires_grad_(True)
                params += list(encoder.parameters())
            elif autocast_dtype is not None:
                encoder.to(dtype=autocast_dtype)
        if autocast_dtype is not None:
            trained.enable_gradient_checkpointing()  # a full UNet's activations are the memory hog
    if autocast_dtype is not None:
        pipe.vae.to(dtype=autocast_dtype)  # done with: the latents are encoded
    trained.train()
    for encoder in encoders:
        encoder.train(spec.train_text_encoder)
    return params


def _text_encoders(pipe) -> list:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, name, None) for name in names) if m is not None]


def _latent_stats(pipe, images, resolution: int, mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std of each image, resized and center-cropped to ``resolution``;
    ``mirrored``: then those of each image mirrored left to right, in the same order."""
    import numpy as np
    from PIL import ImageOps

    def tensor(image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    pixels, flipped = [], []
    for image in images:
        image = ImageOps.fit(image.convert("RGB"), (resolution, resolution))
        pixels.append(tensor(image))
        if mirrored:
            flipped.append(tensor(ImageOps.mirror(image)))
    pixels += flipped
    means, stds = [], []
    for start in range(0, len(pixels), _VAE_BATCH):  # a few at a time: the encoder's activations are large
        batch = torch.stack(pixels[start:start + _VAE_BATCH]).to(pipe.vae.device, dtype=pipe.vae.dtype)
        with torch.no_grad():
            dist = pipe.vae.encode(batch).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _sample(stats: tuple[torch.Tensor, torch.Tensor], batch: int, generator: torch.Generator, pipe,
            mirrored: bool = False) -> tuple[torch.Tensor, list[int]]:
    """A batch of latents drawn from the images' distributions, and which image each is;
    ``mirrored`` (stats of the images, then of their mirror images): each mirrored half the time."""
    mean, std = stats
    count = mean.shape[0] // 2 if mirrored else mean.shape[0]
    index = torch.randint(0, count, (batch,), generator=generator)
    drawn = index + count * torch.randint(0, 2, (batch,), generator=generator) if mirrored else index
    noise = torch.randn(mean[drawn].shape, generator=generator).to(mean.device)
    return (mean[drawn] + std[drawn] * noise - _shift(pipe)) * pipe.vae.config.scaling_factor, index.tolist()


def _shift(pipe) -> float:
    """SD3's VAE shifts its latents as well as scaling them."""
    return pipe.vae.config.get("shift_factor") or 0.0


def _check_prompt_lengths(pipe, spec: TrainSpec) -> None:
    """Training conditions on one text-encoder pass: a longer prompt would be cut, silently."""
    tokenizer = pipe.tokenizer
    room = tokenizer.model_max_length - 2
    texts = [("instance_prompt", spec.instance_prompt), ("class_prompt", spec.class_prompt)]
    texts += [(f"instance_captions[{i}]", caption) for i, caption in enumerate(spec.instance_captions or [])]
    for name, text in texts:
        count = len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0
        if count > room:
            raise UserInputError(f"train.{name}", f"is {count} tokens; training reads at most {room} (one pass "
                                 "of the text encoder), so shorten it")






def _batch(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    states = torch.cat([e[0] for e in encoded])
    pooled = torch.cat([e[1] for e in encoded]) if encoded[0][1] is not None else None
    return states, pooled




def _loss(pipe, family, scheduler, latents, text, resolution: int, generator, prior_weight: float | None,
          snr_gamma: float | None) -> torch.Tensor:
    prediction, target, steps = family.training_prediction(pipe, scheduler, latents, text, resolution, generator)
    prediction, target = prediction.float(), target.float()
    if prior_weight is not None:
        prediction, pred_prior = prediction.chunk(2)
        target, target_prior = target.chunk(2)
        steps = steps.chunk(2)[0]
    if snr_gamma is None:
        loss = F.mse_loss(prediction, target)
    else:  # Min-SNR weighting (Hang et al. 2023), as in diffusers' training examples
        snr = compute_snr(scheduler, steps)
        divisor = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
        weights = torch.clamp(snr, max=snr_gamma) / divisor
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
    if prior_weight is not None:
        loss = loss + prior_weight * F.mse_loss(pred_prior, target_prior)
    return loss






def _class_images(pipe, spec: TrainSpec, device: str, autocast_dtype, emit, cancelled) -> list:
    # Without the safety checker: a blacked-out image would teach the model black squares.
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if hasattr(pipe, "safety_checker") else {}
    drawer = type(pipe).from_pipe(pipe, **no_checker)
    drawer.set_progress_bar_config(disable=True)
    images = []
    for i in range(spec.num_class_images):
        if cancelled():
            raise JobCancelled(f"at class image {i} of {spec.num_class_images}")
        emit(Progress(stage="class_images", step=i, total=spec.num_class_images))
        with torch.no_grad():
            with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                latents = drawer(
                    spec.class_prompt, num_inference_steps=spec.class_inference_steps, width=spec.resolution,
                    height=spec.resolution, generator=torch.Generator("cpu").manual_seed(spec.seed + i),
                    output_type="latent",
                ).images
            # Decoded in fp32, outside autocast: SDXL's VAE overflows in fp16.
            latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + _shift(pipe)
            decoded = pipe.vae.decode(latents).sample
        images += drawer.image_processor.postprocess(decoded.float(), output_type="pil")
    emit(Progress(stage="class_images", step=spec.num_class_images, total=spec.num_class_images))
    return images


def _publish_lora(pipe, family, spec, location, staging, settings, emit, timings) -> tuple[str, int]:
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
        extra = {name: layers(encoder) for name, encoder in zip(names, _text_encoders(pipe))}
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


def _publish_model(pipe, family, spec, location, staging, settings, emit, timings) -> tuple[str, int]:
    start = time.perf_counter()
    emit(Progress(stage="save", step=0, total=1))
    family.denoiser_of(pipe).disable_gradient_checkpointing()
    for module in (family.denoiser_of(pipe), *_text_encoders(pipe)):
        module.eval()
    pipe.to("cpu", precision_dtype(spec.precision))
    pipe.save_pretrained(staging / "model", safe_serialization=True)
    emit(Progress(stage="save", step=1, total=1))
    timings["save"] = ms_since(start)
    compression = "zstd" if location.name.endswith(".zst") else "none"
    out = publish(staging / "model", location, compression, spec.precision, staging=staging, settings=settings,
                  field="train.dest_url", emit=emit, timings=timings)
    return out.sha256, out.size_bytes


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


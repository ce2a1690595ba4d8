"""The training loop: what trains and in which dtype, the loss of a step (the family's
objective, prior preservation and Min-SNR weighting), and the steps themselves."""

from __future__ import annotations

import gc
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from schemas import Progress, TrainSpec

from ..errors import JobCancelled, UserInputError
from ..families import Family
from . import data

_TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_PROGRESS_INTERVAL_S = 0.1  # the contract: throttled only above about 10 events a second
_LOSS_WINDOW = 50


def autocast_dtype(device: str) -> torch.dtype | None:
    if device != "cuda":
        return None  # CPU: plain fp32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare(pipe, family, spec: TrainSpec, autocast_dtype: torch.dtype | None) -> list[torch.nn.Parameter]:
    """Mark what trains (fp32) and cast the rest; return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    encoders = data.text_encoders(pipe)
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
        if autocast_dtype is not None and family.checkpoint_lora_training:
            trained.enable_gradient_checkpointing()  # a 12B transformer's activations: the memory hog
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


def fit(pipe, family: Family, spec: TrainSpec, params: list, instance, prior, embeddings: dict, generator, *,
        device: str, autocast_dtype, emit: Callable[[Progress], None], cancelled: Callable[[], bool]) -> list[float]:
    """The training steps; the losses of the last steps (one per step). ``embeddings``: each
    prompt's encoding, when the text encoders are frozen (else each step encodes its prompts)."""
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
            latents, chosen = data.sample(instance, spec.train_batch_size, generator, pipe, family,
                                          mirrored=spec.random_flip)
            prompts = [spec.instance_captions[i] if spec.instance_captions else spec.instance_prompt for i in chosen]
            if prior is not None:
                latents = torch.cat([latents, data.sample(prior, spec.train_batch_size, generator, pipe, family)[0]])
                prompts += [spec.class_prompt] * spec.train_batch_size
            with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                text = (family.text_batch([embeddings[p] for p in prompts]) if embeddings
                        else family.train_text(pipe, prompts))
                prior_weight = spec.prior_loss_weight if prior is not None else None
                loss = loss_of(pipe, family, scheduler, latents, text, spec.resolution, generator, prior_weight,
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
    return losses



def loss_of(pipe, family, scheduler, latents, text, resolution: int, generator, prior_weight: float | None,
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


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

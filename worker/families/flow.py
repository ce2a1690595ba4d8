"""Training a flow-matching transformer (SD3, FLUX.1) as diffusers' train_dreambooth_lora_sd3 /
_flux scripts do: what it does not do here, and the point on the path from latents to noise
that each step trains at."""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError


def check_flow_training(spec: Any, name: str, sampled: str) -> None:
    """What training a flow-matching transformer family (SD3, FLUX.1) does not do here."""
    if spec.train_text_encoder:
        raise UserInputError("train.train_text_encoder", f"{name} models train their transformer only here")
    if spec.snr_gamma is not None:
        raise UserInputError("train.snr_gamma", f"Min-SNR weighting is for diffusion models; {name} (flow matching) "
                                                f"samples its timesteps {sampled} instead")
    if spec.resolution % 16:
        raise UserInputError("train.resolution", f"must be a multiple of 16 for {name} models, got {spec.resolution}")


def flow_point(scheduler: Any, latents: Any, generator: Any, scheme: str) -> tuple[Any, Any, Any]:
    """The flow-matching training input (diffusers' train_dreambooth_lora_sd3 / _flux recipe): a
    point on the straight path from ``latents`` (sigma 0) to noise (1) at a timestep drawn by
    ``scheme`` (``logit_normal``, or ``none``: uniformly); (that point, the noise, the timesteps)."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    u = compute_density_for_timestep_sampling(scheme, latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    index = (u * scheduler.config.num_train_timesteps).long()
    steps = scheduler.timesteps[index].to(latents.device)
    sigmas = scheduler.sigmas[index].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    return (1 - sigmas) * latents + sigmas * noise, noise, steps

"""Variation seeds (the request's ``variation``), as AUTOMATIC1111 has them: each image starts
from its seed's noise turned toward a second seed's noise by ``strength``, along the sphere
(slerp), so the noise keeps the size a diffusion model expects at every strength. Strength 0 is
the seed's own image, 1 the variation seed's, and small steps between give small changes.

The seed's noise is drawn exactly as the pipeline would draw it (same shape, dtype, device and
generator), so the generators go on to the hires pass or the refiner as they would without
variation. The noise is this worker's (torch's CPU generator): images do not match
AUTOMATIC1111's for the same seeds, which no two UIs' do.
"""

from __future__ import annotations


def starting_noise(pipe, net, generators: list, variation_seeds: list[int], strength: float, width: int,
                   height: int):
    """The ``latents`` for one batch: its images' noise, each turned toward its variation seed's
    (``net``: the pipeline's denoiser)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    factor = pipe.vae_scale_factor
    shape = (len(generators), net.config.in_channels, height // factor, width // factor)
    device, dtype = pipe._execution_device, net.dtype
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    other = randn_tensor(shape, generator=[torch.Generator("cpu").manual_seed(s) for s in variation_seeds],
                         device=device, dtype=dtype)
    return slerp(strength, noise.float(), other.float()).to(dtype)


def slerp(t: float, a, b):
    """Spherical interpolation of each image's noise, from ``a`` (t = 0) to ``b`` (t = 1)."""
    import torch

    flat_a, flat_b = a.flatten(1), b.flatten(1)
    cos = (flat_a / flat_a.norm(dim=1, keepdim=True) * flat_b / flat_b.norm(dim=1, keepdim=True)).sum(1)
    omega = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    if (sin < 1e-6).any():  # (nearly) the same direction: a straight line is as good
        return (1 - t) * a + t * b
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (torch.sin((1 - t) * omega) / sin).view(shape) * a + (torch.sin(t * omega) / sin).view(shape) * b

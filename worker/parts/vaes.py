"""Another VAE for one request (``vae``), kept warm for the next.

What AUTOMATIC1111 calls "SD VAE": many fine-tunes ship a VAE that washes colours out, and
SDXL's own overflows in fp16, so callers swap in another (``stabilityai/sd-vae-ft-mse``,
``madebyollin/sdxl-vae-fp16-fix``). It replaces the model's VAE in this request's pipeline
only: the warm model is untouched, and the next request without ``vae`` runs the model's own.

Sources: a diffusers VAE directory (``config.json`` + ``diffusion_pytorch_model.safetensors``)
from the hub or a local path, or one ``.safetensors`` file (by URL, hub id + ``weight_name``,
or local path) in the original layout (``vae-ft-mse-840000-ema-pruned.safetensors``) or
diffusers', read with the model's own VAE config. Never a pickle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from schemas import Progress, VaeSpec

from ..errors import UserInputError
from ..settings import Settings
from ..sources.cache import DiskCache
from ..timing import ms_since
from .components import Warm, load_module, locate

_DIFFUSERS_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"
_LDM_PREFIXES = ("first_stage_model.", "vae.")


class Vaes:
    """Loaded VAEs, by (source, dtype, device)."""

    def __init__(self, settings: Settings, disk: DiskCache):
        self.settings = settings
        self.disk = disk
        self.warm = Warm()

    def get(self, spec: VaeSpec, own: Any, emit: Callable[[Progress], None], timings: dict[str, float]) -> Any:
        """The VAE ``spec`` names, like the model's ``own`` VAE in device and dtype, checked to fit."""
        start = time.perf_counter()
        path = locate(spec, "vae", "vaes", "VAE", self.settings, self.disk, emit)
        vae, loaded = self.warm.get((str(path), own.dtype, str(own.device)), lambda: _load(path, own))
        if loaded:
            timings["vae"] = ms_since(start)
            self.warm.trim(self.settings.max_loaded_vaes)
        for name in ("latent_channels", "scaling_factor", "shift_factor"):
            if vae.config.get(name) != own.config.get(name):
                raise UserInputError("vae", f"does not fit this model (a VAE for another architecture: its {name} "
                                            f"is {vae.config.get(name)}, the model's {own.config.get(name)})")
        return vae

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()


def _load(path: Path, own: Any) -> Any:
    from diffusers import AutoencoderKL

    def from_dir(folder: Path) -> Any:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=own.dtype, use_safetensors=True)

    def from_file(file: Path) -> Any:
        vae = AutoencoderKL.from_config(own.config)
        vae.load_state_dict(_diffusers_layout(file, own.config), strict=True)
        return vae

    return load_module(path, own, "vae", "VAE", from_dir, from_file)


def _diffusers_layout(path: Path, config: Any) -> dict:
    """A single file's weights keyed as diffusers' AutoencoderKL, whichever layout it is in."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    weights = load_file(path)
    if _DIFFUSERS_KEY in weights:
        return weights
    for prefix in _LDM_PREFIXES:  # a whole checkpoint's VAE, or a VAE file with its keys prefixed
        if any(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return convert_ldm_vae_checkpoint(weights, dict(config))

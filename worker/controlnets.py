"""ControlNets for one request (``controlnets``), kept warm for the next.

A ControlNet steers the denoising with an image the caller has already preprocessed (an edge
map, a depth map, a pose skeleton ...). Each is a diffusers ControlNet directory
(``config.json`` and ``diffusion_pytorch_model.safetensors``; never a pickle) from the hub or a
local path. Loaded ones stay on the device in the dtype of the model they ran with, up to
MAX_LOADED_CONTROLNETS, least recently used out first; a request without ``controlnets`` runs
the plain pipeline.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from schemas import ControlNetSpec

from .errors import ModelSourceError, UserInputError
from .loras import hub_snapshot, quiet_libraries
from .settings import Settings
from .timing import ms_since

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
# What a ControlNet must share with the UNet it steers: its residuals are added block by block.
_MUST_MATCH = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")


class ControlNets:
    """The loaded ControlNets: (directory, dtype, device) -> model, least recently used first."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: OrderedDict[tuple[str, Any, str], Any] = OrderedDict()

    def get(self, specs: list[ControlNetSpec], unet: Any, timings: dict[str, float]) -> list[Any]:
        """The ControlNets ``specs`` name, on ``unet``'s device and dtype, each checked to fit it."""
        start, fresh = time.perf_counter(), False
        nets = []
        for i, spec in enumerate(specs):
            field = f"controlnets[{i}]"
            folder = self._locate(spec, f"{field}.id")
            key = (str(folder), unet.dtype, str(unet.device))
            if key in self._loaded:
                self._loaded.move_to_end(key)
            else:
                self._loaded[key] = self._load(folder, unet, f"{field}.id")
                fresh = True
            net = self._loaded[key]
            wrong = [k for k in _MUST_MATCH if net.config.get(k) != unet.config.get(k)]
            if wrong:
                raise UserInputError(field, f"{spec.id} does not fit this model (a ControlNet for another "
                                            f"architecture: its {', '.join(wrong)} differ)")
            nets.append(net)
        while len(self._loaded) > max(self.settings.max_loaded_controlnets, len(specs)):
            self._loaded.popitem(last=False)
        if fresh:
            timings["controlnets"] = ms_since(start)
        return nets

    def clear(self) -> None:
        """Free the device (for training)."""
        self._loaded.clear()

    def _locate(self, spec: ControlNetSpec, field: str) -> Path:
        if spec.id.startswith("/"):
            return checked_folder(Path(spec.id), field, spec.id, "ControlNet")
        return hub_snapshot(spec.id, ["config.json", WEIGHTS], field, self.settings,
                            lambda folder: checked_folder(folder, field, spec.id, "ControlNet"))

    def _load(self, folder: Path, unet: Any, field: str) -> Any:
        from diffusers import ControlNetModel

        try:
            with quiet_libraries():
                net = ControlNetModel.from_pretrained(folder, torch_dtype=unet.dtype, use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelSourceError(field, f"could not load the ControlNet ({type(exc).__name__}: {detail})") from None
        log.info("loaded ControlNet %s", folder.name)
        return net.to(unet.device).eval()


def checked_folder(folder: Path, field: str, name: str, what: str) -> Path:
    """``folder`` if it holds a diffusers ``what`` (ControlNet, VAE) in safetensors."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(field, f"{name} is not a diffusers {what} (config.json missing)")
    if not (folder / WEIGHTS).is_file():
        raise ModelSourceError(field, f"{name} has no {WEIGHTS} ({what}s are loaded from safetensors only)")
    return folder

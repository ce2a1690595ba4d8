"""ControlNets for one request (``controlnets``), kept warm for the next.

A ControlNet steers the denoising with an image the caller has already preprocessed (an edge
map, a depth map, a pose skeleton ...). Each is a diffusers ControlNet directory
(``config.json`` and ``diffusion_pytorch_model.safetensors``) from the hub or a local path, or
one ``.safetensors`` file (by URL, hub id + ``weight_name``, or local path) in the original
layout (``control_model.*``, lllyasviel's ControlNet 1.1 files) or diffusers'. A single file
carries no config: it is read as a copy of the model's own UNet encoder, which is what the
standard ControlNets are. Never a pickle. Loaded ones stay on the device in the dtype of the
model they ran with, up to MAX_LOADED_CONTROLNETS, least recently used out first; a request
without ``controlnets`` runs the plain pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from schemas import ControlNetSpec, Progress

from .cache import DiskCache
from .errors import ModelSourceError, UserInputError, redact
from .loras import hub_snapshot, locate_file, quiet_libraries
from .settings import Settings
from .timing import ms_since

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
# What a ControlNet must share with the UNet it steers: its residuals are added block by block.
_MUST_MATCH = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")


class ControlNets:
    """The loaded ControlNets: (source, shape, dtype, device) -> model, least recently used first."""

    def __init__(self, settings: Settings, disk: DiskCache):
        self.settings = settings
        self.disk = disk
        self._loaded: OrderedDict[tuple[str, str, Any, str], Any] = OrderedDict()

    def get(self, specs: list[ControlNetSpec], unet: Any, emit: Callable[[Progress], None],
            timings: dict[str, float]) -> list[Any]:
        """The ControlNets ``specs`` name, on ``unet``'s device and dtype, each checked to fit it;
        beyond MAX_LOADED_CONTROLNETS, the least recently used leave the device."""
        start, fresh = time.perf_counter(), False
        nets = []
        for i, spec in enumerate(specs):
            field = f"controlnets[{i}]"
            path = self._locate(spec, field, emit)
            # A single file takes its shape from the UNet: it is another model for another UNet.
            shape = "" if path.is_dir() else json.dumps(dict(unet.config), sort_keys=True, default=str)
            key = (str(path), shape, unet.dtype, str(unet.device))
            if key in self._loaded:
                self._loaded.move_to_end(key)
            else:
                self._loaded[key] = _load(path, unet, f"{field}.url" if spec.url else f"{field}.id")
                fresh = True
            net = self._loaded[key]
            wrong = [k for k in _MUST_MATCH if net.config.get(k) != unet.config.get(k)]
            if wrong:
                raise UserInputError(field, f"{redact(spec.url) if spec.url else spec.id} does not fit this model "
                                            f"(a ControlNet for another architecture: its {', '.join(wrong)} differ)")
            nets.append(net)
        while len(self._loaded) > max(self.settings.max_loaded_controlnets, len(specs)):
            self._loaded.popitem(last=False)
        if fresh:
            timings["controlnets"] = ms_since(start)
        return nets

    def clear(self) -> None:
        """Free the device (for training)."""
        self._loaded.clear()

    def _locate(self, spec: ControlNetSpec, field: str, emit: Callable[[Progress], None]) -> Path:
        """A diffusers ControlNet directory, or a single .safetensors file."""
        if spec.url or spec.weight_name or (spec.id.startswith("/") and Path(spec.id).is_file()):
            return locate_file(spec, field, self.settings, self.disk, emit, kind="controlnets")
        if spec.id.startswith("/"):
            return checked_folder(Path(spec.id), f"{field}.id", spec.id, "ControlNet")
        return hub_snapshot(spec.id, ["config.json", WEIGHTS], f"{field}.id", self.settings,
                            lambda folder: checked_folder(folder, f"{field}.id", spec.id, "ControlNet"))


def _load(path: Path, unet: Any, field: str) -> Any:
    from diffusers import ControlNetModel

    def from_dir(folder: Path) -> Any:
        return ControlNetModel.from_pretrained(folder, torch_dtype=unet.dtype, use_safetensors=True)

    return load_module(path, unet, field, "ControlNet", from_dir, lambda file: _from_single_file(file, unet))


def load_module(path: Path, like: Any, field: str, what: str, from_dir: Callable[[Path], Any],
                from_file: Callable[[Path], Any]) -> Any:
    """A ``what`` (ControlNet, VAE) from a directory or one file, on ``like``'s device and dtype;
    a failure answers for ``field``."""
    try:
        with quiet_libraries():
            module = from_dir(path) if path.is_dir() else from_file(path)
            module = module.to(like.device, like.dtype).eval()  # (inside: diffusers remarks on the cast)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelSourceError(field, f"could not load the {what} ({type(exc).__name__}: {detail})") from None
    log.info("loaded %s %s", what, path.name)
    return module


def _from_single_file(path: Path, unet: Any) -> Any:
    """A ControlNet shaped as a copy of ``unet``'s encoder, with the file's weights (either layout)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    weights = convert_controlnet_checkpoint(load_file(path), net.config)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise ValueError("its weights do not fit a copy of this model's UNet encoder (a ControlNet for "
                         "another architecture, or not a ControlNet); give its diffusers directory instead") from None
    return net


def checked_folder(folder: Path, field: str, name: str, what: str) -> Path:
    """``folder`` if it holds a diffusers ``what`` (ControlNet, VAE) in safetensors."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(field, f"{name} is not a diffusers {what} (config.json missing)")
    if not (folder / WEIGHTS).is_file():
        raise ModelSourceError(field, f"{name} has no {WEIGHTS} ({what}s are loaded from safetensors only)")
    return folder

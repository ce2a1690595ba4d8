"""ControlNets for one request (``controlnets``), kept warm for the next.

A ControlNet steers the denoising with an image the caller has already preprocessed (an edge
map, a depth map, a pose skeleton ...). Each is a diffusers ControlNet directory
(``config.json`` and ``diffusion_pytorch_model.safetensors``) from the hub or a local path, or
one ``.safetensors`` file (by URL, hub id + ``weight_name``, or local path) in the original
layout (``control_model.*``, lllyasviel's ControlNet 1.1 files) or diffusers'. A single file
carries no config: it is read as a copy of the model's own UNet encoder, which is what the
standard ControlNets are. SD3's ControlNets (``SD3ControlNetModel``: Stability's and InstantX's
for SD3 / SD3.5) and FLUX.1's (``FluxControlNetModel``: InstantX's, Shakker-Labs' Union, whose
``mode`` says which kind of control image it is given) come as diffusers directories only.
Never a pickle. Loaded ones stay on the device in the dtype of the model they ran with, up to
MAX_LOADED_CONTROLNETS, least recently used out first; a request without ``controlnets`` runs
the plain pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from schemas import ControlNetSpec, Progress

from ..errors import UserInputError, redact
from ..families import FAMILIES, Family
from ..settings import Settings
from ..sources.cache import DiskCache
from ..timing import ms_since
from .components import Warm, load_module, locate

# The ControlNet classes this worker loads, and which models each is for (the families say).
_KINDS = {family.controlnet.cls: family.controlnet for family in FAMILIES if family.controlnet}


class ControlNets:
    """The loaded ControlNets, by (source, shape, dtype, device)."""

    def __init__(self, settings: Settings, disk: DiskCache):
        self.settings = settings
        self.disk = disk
        self.warm = Warm()

    def get(self, specs: list[ControlNetSpec], family: Family, denoiser: Any, emit: Callable[[Progress], None],
            timings: dict[str, float]) -> list[Any]:
        """The ControlNets ``specs`` name, on the device and dtype of ``denoiser`` (the model's
        UNet or transformer), each checked to be of ``family``'s kind and to fit it; beyond
        MAX_LOADED_CONTROLNETS, the least recently used leave the device."""
        start, fresh = time.perf_counter(), False
        nets = []
        for i, spec in enumerate(specs):
            field = f"controlnets[{i}]"
            path = locate(spec, field, "controlnets", "ControlNet", self.settings, self.disk, emit)
            # A single file takes its shape from the UNet: it is another model for another UNet.
            shape = "" if path.is_dir() else json.dumps(dict(denoiser.config), sort_keys=True, default=str)
            net, loaded = self.warm.get(
                (str(path), shape, denoiser.dtype, str(denoiser.device)),
                lambda: _load(path, family, denoiser, f"{field}.url" if spec.url else f"{field}.id"))
            fresh = fresh or loaded
            kind = family.controlnet
            if type(net).__name__ != kind.cls:
                other = _KINDS[type(net).__name__].models
                raise UserInputError(field, f"{redact(spec.url) if spec.url else spec.id} is a ControlNet for "
                                            f"{other} models ({type(net).__name__}), not for this one")
            wrong = [k for k in kind.must_match if net.config.get(k) != denoiser.config.get(k)]
            if wrong:
                raise UserInputError(field, f"{redact(spec.url) if spec.url else spec.id} does not fit this model "
                                            f"(a ControlNet for another architecture: its {', '.join(wrong)} differ)")
            _check_mode(spec, net, field)
            nets.append(net)
        self.warm.trim(max(self.settings.max_loaded_controlnets, len(specs)))
        if fresh:
            timings["controlnets"] = ms_since(start)
        return nets

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()


def _check_mode(spec: ControlNetSpec, net: Any, field: str) -> None:
    """A Union ControlNet (one net, several kinds of control image) is told which kind by
    ``mode``; the others take none."""
    modes = net.config.get("num_mode")
    name = redact(spec.url) if spec.url else spec.id
    if modes is None and spec.mode is not None:
        raise UserInputError(f"{field}.mode", f"{name} is not a Union ControlNet: it takes no mode")
    if modes is not None and spec.mode is None:
        raise UserInputError(f"{field}.mode", f"{name} is a Union ControlNet: say which kind of control image "
                                              f"this is (0 to {modes - 1}, as its model card numbers them)")
    if modes is not None and spec.mode >= modes:
        raise UserInputError(f"{field}.mode", f"{name} has modes 0 to {modes - 1}, got {spec.mode}")


def _load(path: Path, family: Family, denoiser: Any, field: str) -> Any:
    import diffusers

    def from_dir(folder: Path) -> Any:
        kind = json.loads((folder / "config.json").read_text()).get("_class_name", "ControlNetModel")
        if kind not in _KINDS:
            raise ValueError(f"its config names {kind}, not a ControlNet class this worker loads")
        return getattr(diffusers, kind).from_pretrained(folder, torch_dtype=denoiser.dtype, use_safetensors=True)

    def from_file(file: Path) -> Any:
        if not family.controlnet.single_file:
            raise ValueError(f"{family.name} ControlNets load from their diffusers directory (config.json and "
                             "diffusion_pytorch_model.safetensors), not from one file")
        return _from_single_file(file, denoiser)

    return load_module(path, denoiser, field, "ControlNet", from_dir, from_file)


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

"""Seamless tiling (the request's ``tiling``): images that wrap around, for textures and patterns.

For the job, every padded 2-D convolution of the denoiser, its ControlNets and the VAE pads
circularly instead of with zeros along the tiled axes, as AUTOMATIC1111's "Tiling" does (it sets
``padding_mode = "circular"`` on every ``Conv2d``, both axes). The picture then continues past
its right edge at its left edge (``x``), past its bottom at its top (``y``), or both: copies laid
side by side meet without a seam. The modules are the warm model's, shared with later jobs, so
they are put back as they were when the job ends, whatever way it ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Iterable, Iterator


def axes(tiling: bool | str) -> str:
    """The request's ``tiling`` (false, true, "x" or "y") as the axes that wrap: "", "xy", "x", "y"."""
    return "xy" if tiling is True else tiling or ""


@contextmanager
def wrapping(modules: Iterable, tiled: str) -> Iterator[None]:
    """The padded ``Conv2d`` layers in ``modules`` wrap around along ``tiled`` ("x", "y", "xy")
    inside the block ("": nothing changes)."""
    import torch

    patched = {}  # by id: the modules given may share layers
    try:
        if tiled:
            forward = _conv_forward(tiled)
            for module in filter(None, modules):
                for conv in module.modules():
                    if (isinstance(conv, torch.nn.Conv2d) and conv.padding_mode == "zeros" and id(conv) not in patched
                            and not isinstance(conv.padding, str) and any(conv.padding)):
                        conv._conv_forward = MethodType(forward, conv)  # an instance attribute, deleted below
                        patched[id(conv)] = conv
        yield
    finally:
        for conv in patched.values():
            del conv._conv_forward


def _conv_forward(tiled: str):
    """``Conv2d._conv_forward`` padding circularly along the ``tiled`` axes and with zeros along
    the others; with both tiled, it pads as ``padding_mode="circular"`` does."""
    import torch.nn.functional as F

    x_mode = "circular" if "x" in tiled else "constant"
    y_mode = "circular" if "y" in tiled else "constant"

    def conv_forward(self, input, weight, bias):
        pad_y, pad_x = self.padding
        input = F.pad(input, (pad_x, pad_x, 0, 0), mode=x_mode)
        input = F.pad(input, (0, 0, pad_y, pad_y), mode=y_mode)
        return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)

    return conv_forward

"""Control images made from plain pictures (``controlnets[i].preprocess``).

``canny``: OpenCV's Canny edges, what canny ControlNets were trained on. ``depth``: a depth map
from a depth estimator (``DEPTH_MODEL``, Depth Anything V2 Small by default: 25 M parameters),
run through transformers' depth-estimation pipeline, which scales it to 0-255, near bright, as
depth ControlNets take it. The estimator is loaded on first use and stays on the device until
training needs the room. Both work at the output size, where the ControlNet sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from .components import Warm
from .errors import ModelSourceError, first_line
from .loras import hub_snapshot, quiet_libraries
from .settings import Settings


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges of ``image``, white on black, as an RGB control image."""
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


class Depth:
    """The depth estimator, loaded once."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.device = device
        self.warm = Warm()

    def __call__(self, image: Image.Image, field: str) -> Image.Image:
        """``image``'s depth map, as an RGB control image of its size."""
        estimator, _ = self.warm.get(self.settings.depth_model, lambda: self._load(field))
        return estimator(image)["depth"].convert("RGB")

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()

    def _load(self, field: str) -> Any:
        from transformers import pipeline

        name = self.settings.depth_model
        folder = Path(name) if name.startswith("/") else hub_snapshot(
            name, ["config.json", "preprocessor_config.json", "*.safetensors"], field, self.settings, lambda f: f)
        try:
            with quiet_libraries():
                return pipeline("depth-estimation", model=str(folder), device=self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelSourceError(field, f"the depth estimator DEPTH_MODEL={name} could not be loaded "
                                          f"({type(exc).__name__}: {first_line(exc)})") from None

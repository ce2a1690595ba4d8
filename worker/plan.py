"""One inference job as the engine works it out: what was asked, the model that runs it, and
what each step decides for the next (the pipeline's image arguments, the pipeline, the seeds)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from schemas import InferenceRequest

from .families import Family
from .inpainting import Inpainting
from .models import Loaded
from .sources.refs import EMBEDDED_ID, ModelRef


@dataclass
class Plan:
    request: InferenceRequest
    ref: ModelRef
    loaded: Loaded
    source: str  # where the model came from for this job: memory, cache, hub ...
    timings: dict[str, float]
    images: dict = field(default_factory=dict)  # the pipeline's image and size arguments
    inpainting: Inpainting | None = None  # how an inpainting answer is pasted together
    pipe: Any = None  # the task's pipeline, sharing the loaded model's components
    seeds: list[int] = field(default_factory=list)  # image i's seed
    variation_seeds: list[int] = field(default_factory=list)  # image i's variation seed (none without)
    # One generator per image, so that each image's seed reproduces it alone (the refiner goes
    # on with them where the first pass left them).
    generators: list = field(default_factory=list)
    cached: Any = None  # with step caching: its tally (worker/parts/caching.py)

    def __post_init__(self) -> None:
        import torch

        self.seeds = seeds(self.request.seed, self.request.num_images)
        spec = self.request.variation
        if spec and spec.strength:
            self.variation_seeds = seeds(spec.seed, self.request.num_images)
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]

    @property
    def family(self) -> Family:
        return self.loaded.family

    @property
    def base(self) -> Any:
        """The loaded pipeline, as it stays warm for other jobs."""
        return self.loaded.pipeline

    @property
    def name(self) -> str:
        """The model as answers name it."""
        return self.ref.id if self.ref.id != EMBEDDED_ID else "the embedded model"

    def size(self) -> tuple[int, int]:
        """The first pass's size: as asked or from the input, else the model's own."""
        side = self.family.default_size(self.base)
        return self.images.get("width") or side, self.images.get("height") or side

    def batches(self, max_size: int) -> list[tuple[list, list[int]]]:
        """Generators and variation seeds in batches of at most ``max_size`` images (0: one
        batch): GPU memory grows with the batch."""
        size = max_size or len(self.seeds)
        return [(self.generators[i:i + size], self.variation_seeds[i:i + size])
                for i in range(0, len(self.seeds), size)]


def seeds(first: int | None, count: int) -> list[int]:
    """Image i's seed: ``first + i`` (a random ``first`` when none is given)."""
    first = first if first is not None else secrets.randbits(63)
    return [(first + i) % 2**63 for i in range(count)]

"""The loaded pipelines, kept warm across jobs.

``ModelStore`` is the one owner of loaded pipelines. A request's ``model`` becomes a
``ModelRef`` (worker/sources/refs.py: the endpoint's defaults filled in); the store answers from
memory when it can, else has the ``Locator`` (worker/sources/locate.py) find the weights on
disk, and loads them with the model's family worked out once, kept with it.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from schemas import Progress

from . import families
from .errors import ModelSourceError
from .families import Family
from .parts import compiling, quantizing
from .settings import Settings
from .sources.loading import check_t5, load_pipeline
from .sources.locate import FETCHED_NOW, Locator
from .sources.refs import ModelRef, load_precision
from .timing import ms_since

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    ref: ModelRef
    pipeline: Any  # a diffusers DiffusionPipeline
    family: Family  # worked out once, at load
    # LoRAs resident on its modules, least recently used first: file identity -> adapter name.
    loras: OrderedDict[str, str] = field(default_factory=OrderedDict)
    quantized: str | None = None  # QUANTIZE as applied to its denoiser at load

    @property
    def precision(self) -> str:
        """What it runs in: its family's own, unless one was chosen."""
        return load_precision(self.ref, self.family)


def _weight_bytes(loaded: Loaded) -> int:
    modules = [c for c in loaded.pipeline.components.values() if hasattr(c, "parameters")]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class ModelStore:
    """Loaded pipelines, least recently used first out beyond MAX_LOADED_MODELS / MAX_LOADED_GB.

    On CUDA a pipeline leaving the GPU is parked in CPU RAM (up to MAX_PARKED_MODELS), so
    switching back costs a host-to-device copy instead of a load from disk."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.device = device
        self.locator = Locator(settings)
        self.disk = self.locator.disk
        self._loaded: OrderedDict[ModelRef, Loaded] = OrderedDict()  # on self.device
        self._parked: OrderedDict[ModelRef, Loaded] = OrderedDict()  # in CPU RAM, CUDA only
        self.compile = compiling.mode(settings.compile, device, settings.offload)
        if self.compile != "off":
            compiling.configure(settings.models_dir, device)

    def get(self, ref: ModelRef, emit: Callable[[Progress], None], timings: dict[str, float]) -> tuple[Loaded, str]:
        """The pipeline for ``ref`` and where it came from for this job (``memory`` if warm)."""
        if ref in self._loaded:
            self._loaded.move_to_end(ref)
            return self._loaded[ref], "memory"
        emit(Progress(stage="load", step=0, total=1))
        start = time.perf_counter()
        # Taken out of the parked set first: making room below parks other pipelines, and with
        # MAX_PARKED_MODELS reached that would drop the very one this job is switching back to.
        parked = self._parked.pop(ref, None)
        fetch = self.locator.fetching(ref) if parked is None else None
        if parked is not None:
            loaded, source = parked, "memory"
            self._make_room()
            if not self.offloaded:
                loaded.pipeline.to(self.device)
        elif fetch is not None:
            loaded, source, arrived = self._stream(fetch, ref, emit)  # what is left after the last byte: "load"
            timings["download"] = ms_since(start) - ms_since(arrived)
            start = arrived
        else:
            path, source = self.locator.locate(ref, emit)
            if source in FETCHED_NOW:  # for archives, extraction overlaps the download
                timings["download"] = ms_since(start)
                start = time.perf_counter()
            self._make_room()
            loaded = self._load(path, ref)
        timings["load"] = ms_since(start)
        emit(Progress(stage="load", step=1, total=1))
        self._loaded[ref] = loaded
        budget = self.settings.max_loaded_gb
        while budget and len(self._loaded) > 1 and sum(map(_weight_bytes, self._loaded.values())) > budget * 2**30:
            self._evict()
        log.info("loaded %s from %s in %.0f ms", ref.id, source, timings["load"])
        return loaded, source

    @property
    def offloaded(self) -> bool:
        """OFFLOAD: pipelines stay in CPU RAM, and each job's moves their weights as it runs."""
        return self.settings.offload != "none"

    def holds(self, ref: ModelRef) -> bool:
        """Whether ``ref`` is in memory, on the device or parked (asked from other threads too)."""
        return ref in self._loaded or ref in self._parked

    def loaded(self) -> list[Loaded]:
        """The pipelines on the device, least recently used first."""
        return list(self._loaded.values())

    def parked(self) -> list[Loaded]:
        """The pipelines parked in CPU RAM (CUDA), least recently used first."""
        return list(self._parked.values())

    def clear_device(self) -> None:
        """Free the GPU for a job that needs all of it (training): warm pipelines are parked in
        CPU RAM (up to MAX_PARKED_MODELS), so the next inference gets them back without the disk."""
        if self.device == "cuda":
            while self._loaded:
                self._evict()

    def _make_room(self) -> None:
        """Room for one more pipeline. Called once the weights are found (a bad request must not
        evict the warm model), and before loading (next to a model about to leave, it could run
        out of memory)."""
        while len(self._loaded) >= self.settings.max_loaded_models:
            self._evict()

    def _evict(self) -> None:
        """Move the least recently used pipeline off the device: parked in CPU RAM, or dropped."""
        ref, loaded = self._loaded.popitem(last=False)
        if self.device != "cpu" and self.settings.max_parked_models > 0:
            if not self.offloaded:  # (offloaded, its weights are in CPU RAM already)
                loaded.pipeline.to("cpu")
            self._parked[ref] = loaded
            while len(self._parked) > self.settings.max_parked_models:
                self._parked.popitem(last=False)
        del loaded
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _stream(self, fetch, ref: ModelRef, emit: Callable[[Progress], None]) -> tuple[Loaded, str, float]:
        """Load while the archive arrives (worker/sources/streaming.py): the model, its source, and
        when the last byte came. An archive missing on S3 is built from the model's other source."""
        from .sources.storage import ObjectMissing
        from .sources.streaming import follow

        try:
            built, path, source, arrived = follow(fetch, ref, "cpu" if self.offloaded else self.device, emit,
                                                  self._make_room)
        except ObjectMissing as missing:
            path, source = self.locator.build_missing(ref, emit, missing)
            built, arrived = {}, time.perf_counter()
        self._make_room()  # (done already, if the weights were read as they landed)
        return self._load(path, ref, built), source, arrived

    def _load(self, path: Path, ref: ModelRef, prebuilt: dict[str, Any] | None = None) -> Loaded:
        """``prebuilt``: components loaded already, by name (worker/sources/streaming.py)."""
        try:
            family = families.at(path)  # a model this worker cannot run is refused before loading
        except ModelSourceError as exc:
            raise _could_not_load(ref, exc) from None
        check_t5(ref, family)
        precision = load_precision(ref, family)
        try:
            pipeline = load_pipeline(path, precision, ref.variant, self.device, ref.t5, self.offloaded, prebuilt)
        except ModelSourceError as exc:
            raise _could_not_load(ref, exc) from None
        return self._faster(self._checked(pipeline, ref))

    def add(self, ref: ModelRef, pipeline: Any) -> Loaded:
        """Serve a pipeline built in memory (bench/speed.py) as the model ``ref``, with QUANTIZE
        and COMPILE applied as to one loaded from disk."""
        self._make_room()
        loaded = self._loaded[ref] = self._faster(self._checked(pipeline, ref))
        return loaded

    def _faster(self, loaded: Loaded) -> Loaded:
        """QUANTIZE, then COMPILE, applied once to the denoiser of a model just loaded."""
        denoiser = loaded.family.denoiser_of(loaded.pipeline)
        loaded.quantized = quantizing.quantize(denoiser, self.settings.quantize, self.device, loaded.family.quantizable,
                                               loaded.ref.id)
        if self.compile != "off" and loaded.family.fuses_qkv:
            compiling.fuse(denoiser, self.device)
        compiling.compile_denoiser(denoiser, self.compile, loaded.ref.id, loaded.family.fuses_qkv)
        return loaded

    @staticmethod
    def _checked(pipeline: Any, ref: ModelRef) -> Loaded:
        family = families.of_pipeline(pipeline)
        if family is None:  # its index named classes of ours, but what loaded is not one of our models
            raise ModelSourceError("model.id", f"could not load {ref.id}: {type(pipeline).__name__} is not a model "
                                               "this worker runs")
        return Loaded(ref, pipeline, family)


def _could_not_load(ref: ModelRef, exc: ModelSourceError) -> ModelSourceError:
    return ModelSourceError(exc.field, f"could not load {ref.id}: {str(exc).partition(': ')[2]}")

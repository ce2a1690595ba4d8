"""Load a pipeline while its archive still arrives: each weight as soon as its bytes land.

The fetch (worker/sources/fetches.py) writes the archive's files into the cache's staging
directory and says how far each one has been written. ``follow`` follows it: once
``model_index.json`` has landed it knows the model's family and precision; each tensor of a
component's safetensors files is read the moment its bytes are on disk (from the page cache:
they were just written), converted to the precision the model runs in and, on CUDA, copied to
the device. A diffusers model's skeleton is built with empty weights as soon as its config
lands. When the last byte has arrived, what is left does not grow with the model: put the
tensors in place, and load the small parts (tokenizers, scheduler) from the installed directory.

Text encoders (transformers models) are read as they land and converted by transformers at the
end. A component that cannot be streamed exactly (a GGUF file, modules kept in fp32, keys its
class does not have) is loaded from disk like any other: the images are the same either way
(tested against ``DiffusionPipeline.from_pretrained`` on the same directory).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from schemas import Progress

from .. import families
from ..errors import ModelSourceError
from ..precision import dtype as precision_dtype
from .fetches import Fetch
from .loading import check_t5
from .refs import ModelRef, load_precision

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class _File:
    """One safetensors file of a component, read tensor by tensor as it is written."""

    path: Path  # in staging
    fd: int | None = None
    entries: list | None = None  # (name, dtype, shape, start, end), by offset; None until the header lands
    data_start: int = 0
    next: int = 0  # the first entry not read yet


@dataclass
class _Component:
    name: str
    library: str  # diffusers | transformers
    class_name: str
    files: dict[Path, _File] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    skeleton: Any = None
    broken: str | None = None  # why it is loaded from disk after all

    @property
    def cls(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.library), self.class_name)


class _Follower:
    """Reads a model's weights out of an archive being written (see the module's docstring)."""

    def __init__(self, ref: ModelRef, device: str, before_load: Callable[[], None]):
        self.ref, self.device, self.before_load = ref, device, before_load
        self.root: Path | None = None  # the model's directory in staging
        self.dtype: torch.dtype | None = None
        self.components: dict[str, _Component] = {}
        self.installed: Path | None = None
        self.refused = False  # it is not a model this worker follows: nothing streams

    def follow(self, landed: list) -> None:
        """Read whatever has landed since the last call."""
        if self.refused:
            return
        if self.root is None:
            index = next((f for f in landed if f.done and f.path.name == "model_index.json"), None)
            if index is None:
                return
            try:
                self._start(index.path.parent)
            except (ModelSourceError, OSError, ValueError):
                # Not a model of ours (refused once installed, as from disk), an index gone with a
                # failed fetch, or not an index at all: nothing streams.
                self.refused = True
                return
        for file in landed:
            component = self._component_of(file.path)
            if component is not None and not component.broken:
                try:
                    self._read(component, file)
                except Exception as exc:  # noqa: BLE001 (this part loads from disk instead)
                    component.broken = f"{type(exc).__name__}: {exc}"

    def _start(self, root: Path) -> None:
        index = json.loads((root / "model_index.json").read_text())
        family = families.at(root)  # a model this worker cannot run is refused before anything loads
        check_t5(self.ref, family)
        self.root = root
        self.dtype = precision_dtype(load_precision(self.ref, family))
        left_out = family.without_t5() if family and not self.ref.t5 else {}
        for name, spec in index.items():  # (classes resolved when needed: diffusers may still be importing)
            if isinstance(spec, list) and spec[0] in ("diffusers", "transformers") and name not in left_out:
                self.components[name] = _Component(name, *spec)
        self.before_load()

    def _component_of(self, path: Path) -> _Component | None:
        if self.root is None or path.parent.parent != self.root:
            return None
        component = self.components.get(path.parent.name)
        if component is None or not _is_weights(path.name, self.ref.variant):
            return None
        return component

    def _read(self, component: _Component, landed) -> None:
        file = component.files.setdefault(landed.path, _File(landed.path))
        if file.fd == -1:  # read whole already
            return
        if file.fd is None:
            try:
                file.fd = os.open(self._where(landed.path), os.O_RDONLY)
            except FileNotFoundError:  # installed this moment: read there, once the fetch says where
                return
        if file.entries is None:
            if landed.written < 8:
                return
            (length,) = struct.unpack("<Q", os.pread(file.fd, 8, 0))
            if landed.written < 8 + length:
                return
            header = json.loads(os.pread(file.fd, length, 8))
            header.pop("__metadata__", None)
            file.entries = sorted(((name, _DTYPES[v["dtype"]], v["shape"], *v["data_offsets"])
                                   for name, v in header.items()), key=lambda e: e[3])
            file.data_start = 8 + length
        if component.library == "diffusers" and component.skeleton is None:
            if self._where(landed.path.parent / "config.json").is_file():  # (else built at the end)
                self._build(component, landed.path.parent)
        while file.next < len(file.entries):
            name, dtype, shape, start, end = file.entries[file.next]
            if file.data_start + end > landed.written:
                return
            if name in component.tensors:
                raise ValueError(f"{name} is in two files")
            component.tensors[name] = self._tensor(component, file, dtype, shape, start, end)
            file.next += 1
        os.close(file.fd)
        file.fd = -1  # read whole

    def _tensor(self, component: _Component, file: _File, dtype, shape, start: int, end: int) -> torch.Tensor:
        # At the address alignment a memory map of the file gives the tensor, as diffusers' loader
        # reads it: CPU matmul kernels round differently at different alignments, and the image
        # must equal the one the same weights give loaded from disk.
        skew = (file.data_start + start) % 64
        skew = skew if skew % dtype.itemsize == 0 else 0
        raw = torch.empty(end - start + 64, dtype=torch.uint8)
        raw = raw[(skew - raw.data_ptr()) % 64:][: end - start]
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):
            done += os.preadv(file.fd, [view[done:]], file.data_start + start + done)
        tensor = raw.view(dtype).reshape(shape) if len(view) else torch.empty(shape, dtype=dtype)
        if component.library == "diffusers":  # as diffusers' loader does: floating weights in the model's dtype
            target = self.dtype if tensor.is_floating_point() else tensor.dtype
            tensor = tensor.to(device=self.device, dtype=target)
        return tensor

    def _build(self, component: _Component, folder: Path) -> None:
        """The diffusers model's skeleton, as ``from_pretrained`` builds it: empty weights, in its dtype."""
        import accelerate
        from diffusers.models.modeling_utils import no_init_weights

        if component.cls._keep_in_fp32_modules:
            raise ValueError("it keeps modules in fp32")
        config = component.cls.load_config(str(self._where(folder)))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with no_init_weights(), accelerate.init_empty_weights():
                component.skeleton = component.cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)

    def _where(self, path: Path) -> Path:
        """A staged file's path: in staging, or where it was installed since."""
        if self.installed is None or path.is_relative_to(self.installed):
            return path
        return self.installed / path.relative_to(self.root)

    def assemble(self) -> dict[str, Any]:
        """The streamed components, complete and in place, by name; the rest load from disk."""
        built = {}
        for component in self.components.values():
            if not component.tensors:
                continue
            try:
                if component.broken:
                    raise ValueError(component.broken)
                if any(file.fd != -1 for file in component.files.values()):
                    raise ValueError("a file was not read whole")
                built[component.name] = self._place(component, self.installed / component.name)
            except Exception as exc:  # noqa: BLE001 (loaded from disk instead, exactly)
                log.info("%s not streamed (%s): loading it from disk", component.name, exc)
            component.tensors = {}
        if built:
            log.info("loaded %s while the archive arrived", ", ".join(sorted(built)))
        return built

    def _place(self, component: _Component, path: Path) -> Any:
        if component.library == "diffusers":
            if component.skeleton is None:
                self._build(component, path)
            model = component.skeleton
            model.load_state_dict(component.tensors, strict=True, assign=True)
            model.register_to_config(_name_or_path=str(path))
            return model.eval()
        config = component.cls.config_class.from_pretrained(path)
        model, info = component.cls.from_pretrained(None, config=config, state_dict=component.tensors,
                                                    dtype=self.dtype, output_loading_info=True)
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
            raise ValueError(f"its weights do not match its class ({info})")
        model.config._name_or_path = str(path)
        return model.eval()

    def close(self) -> None:
        for component in self.components.values():
            for file in component.files.values():
                if file.fd is not None and file.fd >= 0:
                    os.close(file.fd)
                    file.fd = -1


def _is_weights(name: str, variant: str | None) -> bool:
    """A weights file diffusers or transformers would load for ``variant``."""
    middle = rf"\.{re.escape(variant)}" if variant else ""
    return re.fullmatch(rf"(diffusion_pytorch_model|model){middle}(-\d+-of-\d+)?\.safetensors", name) is not None


def follow(fetch: Fetch, ref: ModelRef, device: str, emit: Callable[[Progress], None],
           before_load: Callable[[], None]) -> tuple[dict[str, Any], Path, str, float]:
    """Follow the archive ``fetch`` brings until it is installed, reading its weights as they land
    onto ``device`` (see the module's docstring): the components built from them, by name (the
    rest load from disk), the installed directory, its source, and when the last byte came
    (``time.perf_counter()``); or the fetch's error. ``before_load`` runs once the model is known
    to be one this worker runs, before any weight is read."""
    import time

    follower = _Follower(ref, device, before_load)
    fetch.listen(emit)
    try:
        version = 0
        while not fetch.done:
            follower.follow(fetch.snapshot())
            version = fetch.wait(version, timeout=1.0)
        arrived = time.perf_counter()
        installed, source = fetch.take()
        built = {}
        if follower.root is not None:  # (else its index came last, or it is not a model of ours)
            follower.installed = installed
            follower.follow(fetch.snapshot())  # what landed since the last look
            built = follower.assemble()
    finally:
        follower.close()
    return built, installed, source, arrived

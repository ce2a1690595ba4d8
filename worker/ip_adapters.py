"""An IP-Adapter for one request (``ip_adapter``): an image as part of the prompt.

An IP-Adapter is a small set of extra cross-attention weights plus a CLIP image encoder: the
reference image is encoded, and the UNet attends to it beside the text. diffusers installs one
by swapping the UNet's attention processors, which the warm model shares with every job, so the
weights go on for this job only and come off after it (also when it fails): the next job runs
the plain model, bit for bit. The image encoder, the large part (ViT-H is 632M parameters), and
the adapter's weights stay loaded between jobs, up to MAX_LOADED_IP_ADAPTERS.

Sources: a hub repo or a local directory laid out as ``h94/IP-Adapter`` is: ``weight_name``
(``models/ip-adapter_sd15.safetensors``) and the image encoder's folder (default: the
``image_encoder`` folder beside the weights). Safetensors only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from schemas import IpAdapterSpec, Progress

from .errors import ModelSourceError, UserInputError
from .images import load_image
from .loras import hub_snapshot, quiet_libraries
from .settings import Settings
from .timing import ms_since


class IpAdapters:
    """Loaded image encoders and adapter weights: (folder, weights, dtype, device) -> both."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: OrderedDict[tuple[str, str, Any, str], tuple[Any, dict]] = OrderedDict()

    @contextmanager
    def applied(self, pipe: Any, spec: IpAdapterSpec | None, emit: Callable[[Progress], None],
                timings: dict[str, float]) -> Iterator[dict]:
        """Run the body with ``spec``'s IP-Adapter on ``pipe``; yields the pipeline arguments
        that carry its image ({} without one)."""
        if spec is None:
            yield {}
            return
        if not hasattr(pipe, "load_ip_adapter"):
            raise UserInputError("ip_adapter", f"{type(pipe).__name__} pipelines do not take IP-Adapters")
        start = time.perf_counter()
        image = load_image(spec.image, "ip_adapter.image", self.settings)
        encoder, weights = self._get(spec, pipe.unet)
        pipe.register_modules(image_encoder=encoder)  # on this job's pipeline only: diffusers then skips its load
        try:
            try:
                with quiet_libraries():
                    pipe.load_ip_adapter(weights, subfolder="", weight_name="")
            except (RuntimeError, KeyError, ValueError) as exc:
                detail = (str(exc).strip().splitlines() or [""])[0][:160]
                raise UserInputError("ip_adapter", f"does not fit this model (an IP-Adapter for another "
                                                   f"architecture: {type(exc).__name__}: {detail})") from None
            pipe.set_ip_adapter_scale(spec.scale)
            timings["ip_adapter"] = ms_since(start)
            yield {"ip_adapter_image": image}
        finally:
            pipe.unload_ip_adapter()

    def clear(self) -> None:
        """Free the device (for training)."""
        self._loaded.clear()

    def _get(self, spec: IpAdapterSpec, unet: Any) -> tuple[Any, dict]:
        weight_name = PurePosixPath(spec.weight_name)
        encoder_dir = spec.image_encoder or str(weight_name.parent / "image_encoder")
        root = self._locate(spec, encoder_dir)
        key = (str(root / encoder_dir), spec.weight_name, unet.dtype, str(unet.device))
        if key in self._loaded:
            self._loaded.move_to_end(key)
        else:
            self._loaded[key] = (_encoder(root / encoder_dir, unet), _weights(root / spec.weight_name))
            while len(self._loaded) > self.settings.max_loaded_ip_adapters:
                self._loaded.popitem(last=False)
        return self._loaded[key]

    def _locate(self, spec: IpAdapterSpec, encoder_dir: str) -> Path:
        def complete(root: Path) -> Path:
            if not (root / spec.weight_name).is_file():
                raise ModelSourceError("ip_adapter.weight_name", f"{spec.id} has no {spec.weight_name}")
            if not (root / encoder_dir / "config.json").is_file():
                raise ModelSourceError("ip_adapter.image_encoder",
                                       f"{spec.id} has no image encoder in {encoder_dir}/ (config.json missing)")
            return root

        if spec.id.startswith("/"):
            return complete(Path(spec.id))
        patterns = [spec.weight_name, f"{encoder_dir}/config.json", f"{encoder_dir}/*.safetensors"]
        return hub_snapshot(spec.id, patterns, "ip_adapter.id", self.settings, complete)


def _encoder(folder: Path, unet: Any) -> Any:
    from transformers import CLIPVisionModelWithProjection

    if not list(folder.glob("*.safetensors")):
        raise ModelSourceError("ip_adapter.image_encoder", f"{folder.name}/ has no .safetensors weights")
    try:
        with quiet_libraries():
            encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=unet.dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelSourceError("ip_adapter.image_encoder", f"could not load it ({type(exc).__name__}: {detail})") from None
    return encoder.to(unet.device).eval()


def _weights(path: Path) -> dict:
    """The adapter's weights as diffusers' load_ip_adapter takes them: {"image_proj": ..., "ip_adapter": ...}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError("ip_adapter.weight_name", f"is not a readable .safetensors file ({exc})") from None
    grouped: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        if part in grouped:
            grouped[part][name] = value
    if not grouped["image_proj"] or not grouped["ip_adapter"]:
        raise ModelSourceError("ip_adapter.weight_name", "is not an IP-Adapter (no image_proj / ip_adapter weights)")
    return grouped

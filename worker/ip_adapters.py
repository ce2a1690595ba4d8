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
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from schemas import IpAdapterSpec, Progress

from .components import Warm, load_module
from .errors import ModelSourceError, UserInputError, first_line
from .images import load_image
from .loras import hub_snapshot, quiet_libraries
from .settings import Settings
from .timing import ms_since


class IpAdapters:
    """Loaded image encoders with their adapter weights, by (folder, weights, dtype, device)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.warm = Warm()

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
                detail = f"{type(exc).__name__}: {first_line(exc, 160)}"
                raise UserInputError("ip_adapter", f"does not fit this model (an IP-Adapter for another "
                                                   f"architecture: {detail})") from None
            pipe.set_ip_adapter_scale(spec.scale)
            timings["ip_adapter"] = ms_since(start)
            yield {"ip_adapter_image": image}
        finally:
            pipe.unload_ip_adapter()

    def clear(self) -> None:
        """Free the device (for training)."""
        self.warm.clear()

    def _get(self, spec: IpAdapterSpec, unet: Any) -> tuple[Any, dict]:
        weight_name = PurePosixPath(spec.weight_name)
        encoder_dir = spec.image_encoder or str(weight_name.parent / "image_encoder")
        root = self._locate(spec, encoder_dir)
        key = (str(root / encoder_dir), spec.weight_name, unet.dtype, str(unet.device))
        both, loaded = self.warm.get(
            key, lambda: (_encoder(root / encoder_dir, unet), _weights(root / spec.weight_name)))
        if loaded:
            self.warm.trim(self.settings.max_loaded_ip_adapters)
        return both

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
    return load_module(folder, unet, "ip_adapter.image_encoder", "image encoder",
                       lambda path: CLIPVisionModelWithProjection.from_pretrained(path, dtype=unet.dtype,
                                                                                  use_safetensors=True))


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

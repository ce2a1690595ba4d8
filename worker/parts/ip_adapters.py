"""An IP-Adapter for one request (``ip_adapter``): an image as part of the prompt.

An IP-Adapter is a small set of extra cross-attention weights plus a CLIP image encoder: the
reference image is encoded, and the UNet attends to it beside the text. diffusers installs one
by swapping the UNet's attention processors, which the warm model shares with every job, so the
weights go on for this job only and come off after it (also when it fails): the next job runs
the plain model, bit for bit. The image encoder, the large part (ViT-H is 632M parameters), and
the adapter's weights stay loaded between jobs, up to MAX_LOADED_IP_ADAPTERS. Several adapters
(``ip_adapters``) go on together and share the first one's image encoder, as diffusers has it.

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

from ..errors import ModelSourceError, UserInputError, first_line
from ..images import load_image
from ..settings import Settings
from ..sources.files import hub_snapshot
from ..timing import ms_since
from .components import Warm, load_module, quiet_libraries


class IpAdapters:
    """Loaded image encoders, by (folder, dtype, device), and adapters' weights, by file."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.encoders = Warm()
        self.weights = Warm()

    @contextmanager
    def applied(self, pipe: Any, adapters: list[tuple[str, IpAdapterSpec]], emit: Callable[[Progress], None],
                timings: dict[str, float]) -> Iterator[dict]:
        """Run the body with ``adapters`` (each with the field it answers for) on ``pipe``;
        yields the pipeline arguments that carry their images ({} without any). Several share
        the first one's image encoder, as diffusers loads them."""
        if not adapters:
            yield {}
            return
        first = adapters[0][0]
        if not hasattr(pipe, "load_ip_adapter"):
            raise UserInputError(first, f"{type(pipe).__name__} pipelines do not take IP-Adapters")
        for field, spec in adapters[1:]:
            if spec.image_encoder:
                raise UserInputError(f"{field}.image_encoder", f"the IP-Adapters of a request share the first "
                                     f"one's image encoder ({first}); leave it out here")
        start = time.perf_counter()
        images = [self._images(field, spec) for field, spec in adapters]
        # Each adapter's folder, found once; the first one's with the image encoder they share.
        encoder_dir = _encoder_dir(adapters[0][1])
        roots = [self._locate(field, spec, encoder_dir if i == 0 else None) for i, (field, spec) in enumerate(adapters)]
        encoder = self._encoder(first, roots[0] / encoder_dir, pipe.unet)
        weights = [self._weights(field, root / spec.weight_name) for (field, spec), root in zip(adapters, roots)]
        for (field, spec), each in zip(adapters, weights):
            _check_embeddings(field, each, encoder)
        try:
            _load(pipe, encoder, adapters, weights)
            pipe.set_ip_adapter_scale([spec.scale for _, spec in adapters])
            timings["ip_adapter"] = ms_since(start)
            yield {"ip_adapter_image": images}  # one entry per adapter: its image, or its list of them
        finally:
            pipe.unload_ip_adapter()

    def clear(self) -> None:
        """Free the device (for training)."""
        self.encoders.clear()
        self.weights.clear()

    def _images(self, field: str, spec: IpAdapterSpec) -> Any:
        """The adapter's reference image, or its list of them, as diffusers takes each adapter's."""
        first = load_image(spec.image, f"{field}.image", self.settings)
        more = [load_image(source, f"{field}.images[{i}]", self.settings) for i, source in enumerate(spec.images)]
        return [first, *more] if more else first

    def _encoder(self, field: str, folder: Path, unet: Any) -> Any:
        encoder, loaded = self.encoders.get((str(folder), unet.dtype, str(unet.device)),
                                            lambda: _load_encoder(field, folder, unet))
        if loaded:
            self.encoders.trim(self.settings.max_loaded_ip_adapters)
        return encoder

    def _weights(self, field: str, path: Path) -> dict:
        weights, loaded = self.weights.get(str(path), lambda: _load_weights(field, path))
        if loaded:
            self.weights.trim(self.settings.max_loaded_ip_adapters * 4)
        return weights

    def _locate(self, field: str, spec: IpAdapterSpec, encoder_dir: str | None) -> Path:
        """The adapter's folder, with its weights (and ``encoder_dir``, when asked for) in it."""
        def complete(root: Path) -> Path:
            if not (root / spec.weight_name).is_file():
                raise ModelSourceError(f"{field}.weight_name", f"{spec.id} has no {spec.weight_name}")
            if encoder_dir and not (root / encoder_dir / "config.json").is_file():
                raise ModelSourceError(f"{field}.image_encoder",
                                       f"{spec.id} has no image encoder in {encoder_dir}/ (config.json missing)")
            return root

        if spec.id.startswith("/"):
            return complete(Path(spec.id))
        patterns = [spec.weight_name]
        if encoder_dir:
            patterns += [f"{encoder_dir}/config.json", f"{encoder_dir}/*.safetensors"]
        return hub_snapshot(spec.id, patterns, f"{field}.id", self.settings, complete)


def _encoder_dir(spec: IpAdapterSpec) -> str:
    return spec.image_encoder or str(PurePosixPath(spec.weight_name).parent / "image_encoder")


def _load(pipe: Any, encoder: Any, adapters: list[tuple[str, IpAdapterSpec]], weights: list[dict]) -> None:
    """Install the adapters on ``pipe`` with ``encoder``; one that does not fit answers for its
    own field."""
    def install(chosen: list[dict]) -> None:
        pipe.register_modules(image_encoder=encoder)  # on this job's pipeline only: diffusers then skips its load
        with quiet_libraries():
            pipe.load_ip_adapter(chosen, subfolder=[""] * len(chosen), weight_name=[""] * len(chosen))

    try:
        return install(weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        field, failure = adapters[0][0], exc
    if len(weights) > 1:  # which one?
        for (each, _), one in zip(adapters, weights):
            try:
                install([one])
            except (RuntimeError, KeyError, ValueError) as exc:
                field, failure = each, exc
                break
            finally:
                pipe.unload_ip_adapter()
    raise UserInputError(field, f"does not fit this model (an IP-Adapter for another architecture: "
                                f"{type(failure).__name__}: {first_line(failure, 160)})") from None


def _check_embeddings(field: str, weights: dict, encoder: Any) -> None:
    """The adapter takes what the image encoder gives: its image embedding (IP-Adapter) or its
    hidden states (Plus, Full face); otherwise diffusers would fail halfway through the job."""
    proj = weights["image_proj"]
    for key, size, what in [("proj.weight", encoder.config.projection_dim, "image embeddings"),
                            ("proj.0.weight", encoder.config.hidden_size, "hidden states"),
                            ("proj_in.weight", encoder.config.hidden_size, "hidden states")]:
        if key in proj:
            if proj[key].shape[-1] != size:
                raise UserInputError(field, f"takes {what} of {proj[key].shape[-1]} values, and the image "
                                            f"encoder gives {size} (an adapter made for another image encoder)")
            return


def _load_encoder(field: str, folder: Path, unet: Any) -> Any:
    from transformers import CLIPVisionModelWithProjection

    if not list(folder.glob("*.safetensors")):
        raise ModelSourceError(f"{field}.image_encoder", f"{folder.name}/ has no .safetensors weights")
    return load_module(folder, unet, f"{field}.image_encoder", "image encoder",
                       lambda path: CLIPVisionModelWithProjection.from_pretrained(path, dtype=unet.dtype,
                                                                                  use_safetensors=True))


def _load_weights(field: str, path: Path) -> dict:
    """The adapter's weights as diffusers' load_ip_adapter takes them: {"image_proj": ..., "ip_adapter": ...}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError(f"{field}.weight_name", f"is not a readable .safetensors file ({exc})") from None
    grouped: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        if part in grouped:
            grouped[part][name] = value
    if not grouped["image_proj"] or not grouped["ip_adapter"]:
        raise ModelSourceError(f"{field}.weight_name", "is not an IP-Adapter (no image_proj / ip_adapter weights)")
    return grouped

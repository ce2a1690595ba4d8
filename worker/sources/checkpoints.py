"""Single-file checkpoints (``model.checkpoint_url``, ``CHECKPOINT_URL``), converted once.

A ``.safetensors`` or ``.ckpt`` in the original Stable Diffusion layout is fetched like an
archive (parallel, resumable, verified), converted by diffusers' ``from_single_file`` with the
configs of ``model.id`` describing its architecture, and installed in MODELS_DIR/checkpoints as
a diffusers directory of safetensors; the next load is a plain load. Without ``model.id``, the
checkpoint's keys tell its family and architecture (each family in worker/families/ knows its
own; inpainting or not), and the configs are those of the reference model diffusers names for it
(SD 2.x's probed for what its UNet predicts). Checkpoints without text encoders (SD3.5's, as
Stability ships them) borrow them from that model, and transformer files (FLUX.1, FLUX.2,
Z-Image, Qwen-Image) their text encoders and VAE; where a family's pipeline has no single-file
loader (Qwen-Image, FLUX.2), its transformer's reads the file. A GGUF-quantized FLUX.1
transformer (``.gguf``) is installed as it is beside them, and dequantized layer by layer as it
runs.

A ``.ckpt`` is a pickle: it is read only with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers, and rewritten as safetensors before diffusers sees
it, so no code in it can run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import stat
from pathlib import Path
from typing import Callable

from schemas import Progress

from .. import families
from ..errors import ModelSourceError, first_line
from ..families.sd import UNET_INPUT
from ..precision import dtype as precision_dtype
from ..settings import Settings
from .cache import DiskCache, entry_key
from .storage import open_download, parse_location

log = logging.getLogger(__name__)

_SAFETENSORS_MAX_HEADER = 100 * 2**20


def missing_parts(weights: Path, t5: bool = True) -> list[str]:
    """The components a checkpoint comes without, which the model giving its configs must
    supply whole (its family says: SD3's may lack text encoders; T5 only if ``t5``)."""
    return families.checkpoint_lacks(checkpoint_keys(weights), t5)


def checkpoint_keys(weights: Path) -> set[str]:
    """The tensor names of a safetensors or GGUF file."""
    if is_gguf(weights):
        from gguf import GGUFReader

        return {tensor.name for tensor in GGUFReader(weights).tensors}
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        return set(f.keys())


def is_gguf(path: Path) -> bool:
    """A GGUF file (llama.cpp's format, which city96's FLUX quantizations use) starts with GGUF."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def fetch_checkpoint(
    url: str,
    *,
    field: str,
    trusted: bool,
    configs: Callable[[Path], Path],
    config_key: str,
    precision: str,
    settings: Settings,
    disk: DiskCache,
    emit: Callable[[Progress], None],
    t5: bool = True,
    guessed: bool = False,
) -> tuple[Path, str]:
    """The installed diffusers directory converted from the checkpoint at ``url``.

    ``configs``: the diffusers directory whose configs describe the architecture, given the
    fetched weights (as safetensors). ``t5`` false: a checkpoint is converted without its
    T5 (one that lacks it does not have it fetched), and installed apart from the full one.
    ``guessed``: the configs are the reference model's for the file's layout, not the caller's."""
    location = parse_location(url, field, settings, None, "")
    without = "" if t5 else "|no-t5"
    key = entry_key(location.name, f"{location.display}#{location.sha256 or ''}|{config_key}|{precision}{without}")

    def build(staging: Path) -> Path:
        # 1. Fetch to a file, hashing on the way.
        raw = staging / "checkpoint"
        with open_download(location, field, settings, trusted=trusted) as download:
            expected = location.sha256 or download.sidecar_sha256()
            save_download(download, raw, field=field, expected_sha256=expected, max_bytes=settings.max_archive_bytes,
                          emit=emit)
        # 2. Plain weights only: a pickle becomes safetensors without running anything in it.
        #    (diffusers picks its reader by the file's extension.)
        weights = staging / "weights.safetensors"
        if is_gguf(raw):  # quantized weights: kept as they are (diffusers dequantizes them as it runs)
            weights = staging / "transformer.gguf"
            raw.rename(weights)
        elif is_safetensors(raw):
            raw.rename(weights)
        else:
            _pickle_to_safetensors(raw, weights, field)
        # 3. Convert with the configs of model.id (or the reference model for its layout), at the
        #    precision it will run in.
        config_dir = configs(weights)
        emit(Progress(stage="load", step=0, total=1))
        _convert(weights, config_dir, staging / "model", precision, field, t5, guessed)
        return staging / "model"

    path, converted = disk.obtain("checkpoints", key, build)
    return path, "checkpoint" if converted else "cache"


def save_download(download, path: Path, *, field: str, expected_sha256: str | None, max_bytes: int, emit) -> None:
    from .archives import byte_progress

    on_bytes = byte_progress(emit, "download", download.size)
    digest, count = hashlib.sha256() if expected_sha256 else None, 0  # (no digest to check: no hashing)
    with open(path, "wb") as out:
        for chunk in download.chunks():
            count += len(chunk)
            if count > max_bytes:
                raise ModelSourceError(field, f"checkpoint is larger than {max_bytes} bytes")
            if digest:
                digest.update(chunk)
            out.write(chunk)
            on_bytes(count)
    if download.size is not None and count != download.size:
        raise ModelSourceError(field, f"download ended after {count} of {download.size} bytes")
    if digest and digest.hexdigest() != expected_sha256:
        raise ModelSourceError(field, f"sha256 mismatch: expected {expected_sha256}, got {digest.hexdigest()}")


def is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header. Special files
    (devices, pipes, /proc's files, which say they are empty) are not, and are not read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size < 9:
            return False
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def reference_model(weights: Path, field: str) -> str:
    """The hub model whose configs describe this checkpoint, told from its keys.

    The reference models are diffusers' own (what its ``from_single_file`` picks without a
    config); which one is decided here, from which text encoders are present and how many
    channels the UNet takes (9: inpainting), so that a file that is not a Stable Diffusion
    checkpoint gets an answer saying so instead of a failed conversion."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from safetensors import safe_open

    keys = checkpoint_keys(weights)
    inpaint = False
    if UNET_INPUT in keys:
        with safe_open(weights, "pt") as f:
            inpaint = f.get_slice(UNET_INPUT).get_shape()[1] == 9

    kind = families.checkpoint_reference(keys, inpaint)
    if kind is None and UNET_INPUT not in keys:
        if any("lora" in k.lower() for k in keys):
            raise ModelSourceError(field, "is a LoRA, not a model: pass it in loras, with the model it was made for")
        raise ModelSourceError(
            field, "is not a Stable Diffusion checkpoint (no UNet under model.diffusion_model) nor a FLUX, "
            "Z-Image or Qwen-Image transformer; if it is one in another layout, name a diffusers model with its "
            "architecture in model.id"
        )
    if kind is None:
        raise ModelSourceError(
            field, "has a UNet but no text encoder this worker knows; name the model it belongs to in model.id"
        )
    # (a family may name a hub model itself where diffusers has no reference for its layout)
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {"pretrained_model_name_or_path": kind})[
        "pretrained_model_name_or_path"]


def _pickle_to_safetensors(path: Path, out: Path, field: str) -> Path:
    import torch
    from safetensors.torch import save_file

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise ModelSourceError(
            field, f"refused to load the .ckpt: it is not plain weights ({type(exc).__name__}); "
            "only tensors are read from pickles, never code"
        ) from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelSourceError(field, "the .ckpt holds no state dict")
    tensors = {k: v.contiguous() for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelSourceError(field, "the .ckpt holds no tensors")
    save_file(tensors, out)
    return out


def _parts(weights: Path, config_dir: Path, index: dict, dtype, field: str, t5: bool) -> dict:
    """What the checkpoint lacks, loaded from the configs' model (``index``: its
    model_index.json; diffusers will not look there); without ``t5``, the model's T5 left out."""
    import importlib

    family = families.from_components(families.components(index))
    parts = family.without_t5() if family and not t5 else {}
    for name in missing_parts(weights, t5):
        library, class_name = index[name]
        try:
            parts[name] = getattr(importlib.import_module(library), class_name).from_pretrained(
                config_dir / name, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelSourceError(field, f"comes without its {name} and the configs' model has none to lend "
                                          f"({type(exc).__name__})") from None
    return parts


def _install_gguf(weights: Path, config_dir: Path, out: Path, field: str) -> None:
    """A GGUF-quantized denoiser cannot be saved again as safetensors (diffusers does not
    serialize GGUF weights): installed as the configs' model with the file in its denoiser's
    folder, which the loader reads with diffusers' GGUF quantizer."""
    import os
    import shutil

    index = json.loads((config_dir / "model_index.json").read_text())
    family = families.from_components(families.components(index))
    if family is None or family.denoiser != "transformer":
        raise ModelSourceError(field, "is a GGUF file: this worker reads GGUF transformers of FLUX.1 only")

    def link(source: str, target: str) -> None:  # (the lent text encoders: gigabytes, not copied)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(config_dir, out, copy_function=link, ignore=lambda folder, names: [
        n for n in names if Path(folder).name == "transformer" and n.endswith((".safetensors", ".bin", ".json"))
        and n != "config.json"])
    weights.rename(out / "transformer" / "transformer.gguf")


def _convert(weights: Path, config_dir: Path, out: Path, precision: str, field: str, t5: bool = True,
             guessed: bool = False) -> None:
    import diffusers

    if is_gguf(weights):
        return _install_gguf(weights, config_dir, out, field)
    index = json.loads((config_dir / "model_index.json").read_text())
    class_name = index["_class_name"]
    pipeline_class = getattr(diffusers, class_name, None)
    family = families.from_components(families.components(index))
    denoiser_file = _denoiser_file(weights, family, index)
    if denoiser_file is None and (pipeline_class is None or not hasattr(pipeline_class, "from_single_file")):
        raise ModelSourceError("model.id", f"{class_name} pipelines cannot load single-file checkpoints")
    dtype = precision_dtype(precision)
    try:
        if denoiser_file is not None:  # the file is the transformer alone; the rest is the configs' model's
            denoiser = denoiser_file.from_single_file(str(weights), config=str(config_dir), subfolder=family.denoiser,
                                                      local_files_only=True, dtype=dtype)
            parts = {family.denoiser: denoiser} | family.own_components(config_dir)
            pipeline = pipeline_class.from_pretrained(config_dir, local_files_only=True, dtype=dtype, **parts)
            family.attach(pipeline, config_dir)
        else:
            pipeline = pipeline_class.from_single_file(
                str(weights), config=str(config_dir), local_files_only=True, dtype=dtype,
                **_parts(weights, config_dir, index, dtype, field, t5))
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        detail = first_line(exc)
        raise ModelSourceError(
            field, f"could not convert the checkpoint with the configs of model.id ({type(exc).__name__}: {detail})"
        ) from None
    if guessed and family:
        family.fit_reference_configs(pipeline)
    _follow_markers(pipeline, weights)
    pipeline.save_pretrained(out, safe_serialization=True)


def _denoiser_file(weights: Path, family, index: dict):
    """The diffusers class that reads ``weights`` alone, where it is a transformer file of a
    family whose pipeline has no single-file loader of its own (Qwen-Image): its transformer's
    class reads it, and the pipeline is the configs' model's with it. None otherwise."""
    import diffusers

    if family is None or family.denoiser != "transformer" or family.checkpoint_reference(
            checkpoint_keys(weights), False) is None:
        return None
    pipeline_class = getattr(diffusers, index["_class_name"], None)
    denoiser_class = getattr(diffusers, index[family.denoiser][1], None)
    if hasattr(pipeline_class, "from_single_file") or not hasattr(denoiser_class, "from_single_file"):
        return None
    return denoiser_class


def _follow_markers(pipeline, weights: Path) -> None:
    """Some fine-tunes say how they were trained with marker tensors (SDXL v-prediction models
    such as NoobAI-XL's): ``v_pred``, the UNet predicts the velocity; with it, ``ztsnr``,
    trained with zero terminal SNR. ComfyUI reads these keys; diffusers does not, and with the
    configs' noise prediction such a model would draw washed-out mush. The markers win over the
    configs."""
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
    if "v_pred" not in keys:
        return
    changes: dict = {"prediction_type": "v_prediction"}
    if "ztsnr" in keys:  # (the last step at pure noise, as diffusers has it: betas rescaled, trailing steps)
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    log.info("checkpoint marked %s: scheduler %s", "+".join(k for k in ("v_pred", "ztsnr") if k in keys), changes)
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **changes)

"""QUANTIZE: torchao's quantization of a DiT denoiser's linear layers, once at load; the warm
model keeps it (parked in CPU RAM too).

``fp8``: weights and activations in fp8 with a scale per row (torchao's
``Float8DynamicActivationFloat8WeightConfig``, as flux-fast runs FLUX.1) on CUDA GPUs with fp8
(compute capability 8.9 and up: Ada, Hopper, Blackwell); elsewhere int8 weight-only instead, said
in the log and in the answer's ``model.quantize``. ``int8``: int8 weights, computed in the model's
precision (``Int8WeightOnlyConfig``): half of bf16's weight memory.

UNet families are left as they are (their convolutions are most of their work; torchao's
configs quantize linear layers), and so are GGUF denoisers, quantized already.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

log = logging.getLogger(__name__)


def quantize(denoiser: Any, setting: str, device: str, quantizable: bool, name: str) -> str | None:
    """Quantize ``denoiser`` in place as QUANTIZE says; what was applied, or None."""
    if setting == "none":
        return None
    if not quantizable:
        log.info("QUANTIZE=%s leaves %s as it is: quantization is for DiT denoisers", setting, name)
        return None
    if getattr(denoiser, "is_quantized", False):
        log.info("QUANTIZE=%s leaves %s as it is: its denoiser is quantized already (GGUF)", setting, name)
        return None
    import torch

    applied = setting
    if setting == "fp8" and not (device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)):
        log.info("QUANTIZE=fp8: %s has no fp8 matrix multiply; %s gets int8 weight-only instead", device, name)
        applied = "int8"
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow, quantize_

    # peft wraps int8 layers for LoRAs, and warns that merging them would fail: LoRAs are never
    # merged here (adapters are switched per request).
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning)
    if applied == "fp8":
        # fp8 kernels want sides in multiples of 16; smaller layers (embeddings' in tiny models) stay.
        quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, _: isinstance(module, torch.nn.Linear)
                  and module.in_features % 16 == 0 and module.out_features % 16 == 0)
    else:
        quantize_(denoiser, Int8WeightOnlyConfig())
    return applied


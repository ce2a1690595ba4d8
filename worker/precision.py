"""The precisions requests and settings name (``fp32``, ``fp16``, ``bf16``) as torch dtypes:
one map for loading, converting and training."""

from __future__ import annotations

from typing import Any


def dtype(precision: str) -> Any:
    """The torch dtype of ``precision``."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def pick_device(choice: str) -> str:
    """The device to run on: DEVICE's choice, ``auto`` being CUDA where there is one."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is visible")
    return choice

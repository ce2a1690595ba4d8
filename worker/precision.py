"""The precisions requests and settings name (``fp32``, ``fp16``, ``bf16``) as torch dtypes:
one map for loading, converting and training."""

from __future__ import annotations

from typing import Any


def dtype(precision: str) -> Any:
    """The torch dtype of ``precision``."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


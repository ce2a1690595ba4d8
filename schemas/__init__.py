"""Request and result models: the worker's public contract, with no torch import."""

from .errors import describe_validation_error
from .request import InferenceRequest, Limits, ModelSpec, OutputSpec
from .result import ImageOut, ModelInfo, Progress, Result
from .schedulers import SCHEDULERS, canonical_scheduler

__all__ = [
    "InferenceRequest",
    "Limits",
    "ModelSpec",
    "OutputSpec",
    "ImageOut",
    "ModelInfo",
    "Progress",
    "Result",
    "SCHEDULERS",
    "canonical_scheduler",
    "describe_validation_error",
]

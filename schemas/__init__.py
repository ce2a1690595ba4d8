"""Request and result models: the worker's public contract, with no torch import."""

from .common import Limits, ModelSpec
from .compat import RequestError
from .convert import ConvertRequest, ConvertSpec
from .errors import describe_validation_error
from .options import CacheSpec, HiresSpec, OutpaintSpec, OutputSpec, VariationSpec
from .parse import S3Config, parse_request
from .parts import ControlNetSpec, EmbeddingSpec, IpAdapterSpec, LoraSpec, RefinerSpec, VaeSpec
from .request import InferenceRequest
from .result import CacheOut, ConvertOut, ImageOut, ModelInfo, Progress, Result, TrainOut
from .schedulers import SCHEDULERS, a1111_name, canonical_scheduler
from .train import TrainRequest, TrainSpec

__all__ = [
    "RequestError",
    "ConvertRequest",
    "ConvertSpec",
    "ConvertOut",
    "parse_request",
    "InferenceRequest",
    "Limits",
    "LoraSpec",
    "ControlNetSpec",
    "HiresSpec",
    "VariationSpec",
    "OutpaintSpec",
    "CacheSpec",
    "CacheOut",
    "IpAdapterSpec",
    "VaeSpec",
    "EmbeddingSpec",
    "S3Config",
    "TrainRequest",
    "TrainSpec",
    "TrainOut",
    "ModelSpec",
    "RefinerSpec",
    "OutputSpec",
    "ImageOut",
    "ModelInfo",
    "Progress",
    "Result",
    "SCHEDULERS",
    "a1111_name",
    "canonical_scheduler",
    "describe_validation_error",
]

"""A job's ``input`` to its request model: the inference request, ``train``'s or ``convert``'s,
by its ``task``, after translating docker-diffusers-api and AUTOMATIC1111 payloads; and RunPod's
per-job bucket (``s3Config``) beside it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .common import Limits
from .convert import ConvertRequest
from .request import InferenceRequest
from .train import TrainRequest


class S3Config(BaseModel):
    """RunPod's per-job bucket (the job's ``s3Config``, beside ``input``): where images are
    uploaded, with its own credentials. Unknown keys are ignored: RunPod owns this shape."""

    model_config = ConfigDict(extra="ignore")

    accessId: str = Field(..., min_length=1, max_length=1024)
    accessSecret: SecretStr = Field(..., min_length=1, max_length=4096)
    bucketName: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
    endpointUrl: str = Field(..., pattern=r"^https?://", max_length=4096)


def parse_request(data: Any, limits: Limits) -> InferenceRequest | ConvertRequest | TrainRequest:
    """The request model for a job's input: by its ``task``; docker-diffusers-api and
    AUTOMATIC1111 payloads are translated first (``legacy`` or ``a1111`` is then set, and the
    answer takes that shape too)."""
    from .a1111 import describe_a1111_error, echo, from_a1111, is_a1111
    from .compat import RequestError, describe_legacy_error, from_legacy, is_legacy
    from .convert import ConvertRequest
    from .train import TrainRequest

    if is_a1111(data):
        try:
            request = InferenceRequest.model_validate(from_a1111(data), context={"limits": limits})
        except ValidationError as exc:
            raise RequestError(describe_a1111_error(exc)) from None
        request._a1111 = echo(data)
        return request

    if is_legacy(data):
        translated = from_legacy(data)
        model = TrainRequest if translated.get("task") == "train" else InferenceRequest
        try:
            request = model.model_validate(translated, context={"limits": limits})
        except ValidationError as exc:
            raise RequestError(describe_legacy_error(exc, data)) from None
        request._legacy = True
        return request
    task = data.get("task") if isinstance(data, dict) else None
    model = {"convert": ConvertRequest, "train": TrainRequest}.get(task, InferenceRequest)
    return model.model_validate(data, context={"limits": limits})

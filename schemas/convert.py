"""Converting a model to a safetensors archive on S3-compatible storage (``task: "convert"``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import ModelSpec, Precision, S3Url, Strict


class ConvertSpec(Strict):
    """Where and how to publish the converted model."""

    dest_url: S3Url = Field(
        ...,
        max_length=8192,
        description="s3://bucket/key, s3:///bucket/key, or s3:// / s3:///bucket/ for the conventional name "
        "models--ORG--NAME--PRECISION.tar.zst in the default / given bucket.",
    )
    precision: Precision = Field("fp16", description="dtype of the published weights.")
    compression: Literal["zstd", "none"] = Field("zstd", description="`.tar.zst`, or a plain `.tar`.")


class ConvertRequest(Strict):
    """Convert a model (hub id, local directory, archive or single-file checkpoint) to a
    safetensors archive and upload it to S3-compatible storage."""

    task: Literal["convert"]
    model: ModelSpec = Field(default_factory=ModelSpec, description="The source; missing fields from MODEL_*.")
    convert: ConvertSpec
    stream: bool = Field(False, description="Yield progress events (load, save, pack, upload) while working.")

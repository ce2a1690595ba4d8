"""What comes back (docs/requests.md, Results): progress events while working, the result last.

These are dumped once, at the edge, with ``dump()``: fields that are None are left out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ModelSource = Literal["embedded", "local", "cache", "hub", "memory", "baked", "url", "checkpoint"]


class _Out(BaseModel):
    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class ImageOut(_Out):
    base64: str | None = Field(None, description="The encoded image (when not uploaded).")
    url: str | None = Field(None, description="Where the image was uploaded: s3://bucket/key.")
    presigned_url: str | None = Field(None, description="An https link to the uploaded image, for a while.")
    format: Literal["png", "jpeg", "webp"]
    seed: int = Field(description="Reproduces this image with `seed` and `num_images: 1`.")
    variation_seed: int | None = Field(None, description="With `variation`: this image's variation seed.")
    width: int
    height: int
    nsfw: bool | None = Field(None, description="The safety checker's verdict, when it ran.")


class ModelInfo(_Out):
    id: str
    source: ModelSource = Field(description="Where the weights came from for this job.")
    revision: str | None = None
    precision: str
    device: str
    compile: str | None = Field(None, description="COMPILE as the denoiser ran: `regional` or `full` (absent: eager).")
    quantize: str | None = Field(None, description="QUANTIZE as applied to the denoiser's weights: `fp8` or `int8`.")


class CacheOut(_Out):
    method: str = Field(description="The step cache the job ran with (the request's `cache`, or the endpoint's).")
    passes: int = Field(description="Passes of the denoiser (a step takes one, two with true CFG).")
    approximated: int = Field(description="Of those, passes the cache approximated (reused or predicted) in part "
                                          "or whole instead of computing.")


class ConvertOut(_Out):
    url: str = Field(description="Where the archive was published (s3://bucket/key).")
    sha256: str
    size_bytes: int
    precision: str
    compression: str


class TrainOut(_Out):
    method: str
    url: str = Field(description="Where the result was published: a .safetensors LoRA or a model archive.")
    sha256: str
    size_bytes: int
    precision: str
    steps: int
    loss: float = Field(description="Mean training loss over the last steps (up to 50).")
    instance_images: int
    class_images: int = 0


class Result(_Out):
    type: Literal["result"] = "result"
    task: str
    images: list[ImageOut] = Field(default_factory=list)
    convert: ConvertOut | None = None
    train: TrainOut | None = None
    timings: dict[str, float] = Field(description="Milliseconds per phase that ran, and total_ms.")
    model: ModelInfo
    refiner: ModelInfo | None = Field(None, description="With a refiner: where its weights came from.")
    cache: CacheOut | None = Field(None, description="With step caching: what it approximated.")


class Progress(_Out):
    type: Literal["progress"] = "progress"
    stage: Literal["load", "download", "inference", "hires", "refiner", "class_images", "train", "encode", "save",
                   "pack", "upload"]
    step: int
    total: int
    loss: float | None = Field(None, description="stage train: this step's loss.")

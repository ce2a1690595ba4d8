"""The nested options of an inference request: how its images come out (``output``), the
canvas outpainting adds (``outpaint``), variation seeds (``variation``) and the hires fix
(``hires``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import S3Url, Strict


class OutputSpec(Strict):
    """How images come back."""

    format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    quality: int | None = Field(
        None, ge=1, le=100, description="JPEG / WebP quality (default 90); PNG is lossless."
    )
    metadata: bool = Field(
        False, description="Write how each image was made (prompt, seed, steps, ...) into the file, "
        "as AUTOMATIC1111 does: a PNG text chunk `parameters`, or EXIF for JPEG / WebP.",
    )
    upload_url: S3Url | None = Field(
        None,
        max_length=4096,
        description="Upload the images to s3://bucket/prefix/ (or s3:///bucket/prefix/) and answer with their "
        "URLs instead of base64. Bare s3:// means the bucket of the job's s3Config.",
    )


class OutpaintSpec(Strict):
    """Outpainting: the image's canvas grown by these margins, which are painted to match it."""

    left: int = Field(0, ge=0, le=2048, description="Pixels added on the left.")
    right: int = Field(0, ge=0, le=2048, description="Pixels added on the right.")
    top: int = Field(0, ge=0, le=2048, description="Pixels added at the top.")
    bottom: int = Field(0, ge=0, le=2048, description="Pixels added at the bottom.")
    fill: Literal["edge", "reflect"] = Field(
        "edge", description="What the margins start from before they are painted: the image's edge pixels "
        "stretched out, or the image mirrored at its edges."
    )

    @model_validator(mode="after")
    def _grows(self) -> OutpaintSpec:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("left: at least one of left, right, top, bottom must add pixels")
        return self


class VariationSpec(Strict):
    """AUTOMATIC1111's variation seed: each image's starting noise turned, along the sphere, toward
    a second seed's noise, so that small strengths give small variations of the same image."""

    seed: int | None = Field(
        None, ge=0, lt=2**63, description="The second seed (image i: seed + i); random when absent. Each image "
        "reports its own as variation_seed."
    )
    strength: float = Field(
        ..., ge=0, le=1, description="How far toward the variation seed's noise: 0 the seed's own image, 1 the "
        "variation seed's."
    )


class HiresSpec(Strict):
    """AUTOMATIC1111's hires fix: generate, upscale, then denoise again at the larger size."""

    scale: float = Field(2.0, gt=1, le=4, description="Final size over the first pass's size.")
    strength: float = Field(0.7, gt=0, le=1, description="How much the second pass changes the upscaled image.")
    steps: int | None = Field(
        None, ge=1, le=1000, description="Second-pass steps before strength (default: num_inference_steps)."
    )
    upscaler: Literal["latent", "lanczos"] = Field(
        "latent", description="latent: resize the latents (bilinear); lanczos: decode, resize the image, encode."
    )
    prompt: str | None = Field(
        None, min_length=1, max_length=20_000, description="The second pass's own prompt (default: the prompt), "
        "AUTOMATIC1111's hires prompt: details to add at the larger size."
    )
    negative_prompt: str | None = Field(
        None, max_length=20_000, description="The second pass's own negative prompt (default: the negative prompt)."
    )

    def final(self, width: int, height: int, multiple: int = 8) -> tuple[int, int]:
        """The second pass's size: the first's times ``scale``, rounded down to a multiple of
        ``multiple`` (8, the VAE's factor; 16 for SD3)."""
        return int(width * self.scale) // multiple * multiple, int(height * self.scale) // multiple * multiple

    def size(self, width: int, height: int, multiple: int = 8) -> int:
        final = self.final(width, height, multiple)
        return final[0] * final[1]


class CacheSpec(Strict):
    """Lossy step caching for one request (diffusers' cache hooks): parts of some steps are
    reused or predicted instead of computed, for speed at a small cost in fidelity; off again
    after the job."""

    method: Literal["first_block", "taylorseer", "magcache", "faster"] = Field(
        ..., description="`first_block`: skip the rest of a step when its first block changed little; "
        "`taylorseer`: compute every `interval`-th step, predict the others from a Taylor series; `magcache`: skip "
        "steps by the model's calibrated residual magnitudes (FLUX.1's ship with diffusers); `faster`: FasterCache "
        "(attention outputs reused across steps)."
    )
    threshold: float | None = Field(
        None, gt=0, le=1, description="first_block (default 0.05) and magcache (default 0.06): how small a change "
        "counts as reusable; higher is faster and less faithful."
    )
    interval: int | None = Field(
        None, ge=1, le=20, description="taylorseer: steps between full computations (default 5)."
    )

    @model_validator(mode="after")
    def _options_of_its_method(self) -> CacheSpec:
        if self.threshold is not None and self.method not in ("first_block", "magcache"):
            raise ValueError(f"threshold: for first_block and magcache, not {self.method}")
        if self.interval is not None and self.method != "taylorseer":
            raise ValueError(f"interval: for taylorseer, not {self.method}")
        return self

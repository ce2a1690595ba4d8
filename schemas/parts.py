"""What a request adds to the model for one job: a refiner, LoRAs, embeddings, a VAE,
ControlNets, IP-Adapters; each names its weights by URL, hub id or path."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import ImageSource, ModelSpec, RepoOrPath, Strict


class RefinerSpec(ModelSpec):
    """An SDXL refiner taking over the last part of the denoising: any model form ``model`` takes."""

    switch: float = Field(0.8, gt=0, lt=1, description="Fraction of the steps the model runs before the refiner.")

    @model_validator(mode="after")
    def _named(self) -> RefinerSpec:
        if self.id is None and self.url is None and self.checkpoint_url is None:
            raise ValueError("id: name the refiner (id, url or checkpoint_url)")
        if self.t5 is not None:
            raise ValueError("t5: a refiner is an SDXL model, with no T5 to leave out")
        return self


class _FileSource(Strict):
    """One .safetensors file: by URL, or a hub repo id / local path with an optional file name."""

    url: str | None = Field(
        None, max_length=8192,
        description="https://, http://, s3://bucket/key or s3:///bucket/key of a .safetensors file; "
        "`#sha256=` verifies it.",
    )
    id: RepoOrPath | None = Field(
        None, max_length=4096, description="Hub repo id (`org/name`) or absolute path of a file or directory."
    )
    weight_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,200}\.safetensors$",
        description="With `id`: which .safetensors file of the repo (default: its only one).",
    )

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://", "s3://")):
            raise ValueError(f"must be an https://, http:// or s3:// URL, got {value[:60]!r}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> _FileSource:
        if (self.url is None) == (self.id is None):
            raise ValueError("give exactly one of url or id")
        if self.weight_name and self.url:
            raise ValueError("weight_name: only with id")
        return self


class EmbeddingSpec(_FileSource):
    """A textual-inversion embedding for one request: a new word for prompts to use."""

    token: str | None = Field(
        None, pattern=r"^\S{1,64}$",
        description="The word prompts use for it (default: the one stored in the file, else the file's name).",
    )


class LoraSpec(_FileSource):
    """A LoRA applied for one request: from a URL (.safetensors) or a hub id / local directory."""

    scale: float = Field(1.0, ge=-10, le=10, description="How strongly it applies; 0 turns it off.")


class VaeSpec(_FileSource):
    """A VAE replacing the model's for one request: a diffusers VAE directory (hub id or local
    path), or one .safetensors file (URL, hub id + weight_name, local path) in either layout."""


class ControlNetSpec(_FileSource):
    """A ControlNet steering one request with an image (edges, depth, pose ...), preprocessed:
    a diffusers ControlNet directory (hub id or local path), or one .safetensors file (URL,
    hub id + weight_name, local path) in the original layout or diffusers'."""

    image: ImageSource = Field(..., description="The control image, preprocessed (an edge map, a depth map ...) "
                               "unless `preprocess` says otherwise: base64, `data:` URI or http(s) URL.")
    preprocess: Literal["canny", "depth", "openpose"] | None = Field(
        None, description="Make the control image from a plain picture first, at the output size: `canny` "
        "edges (OpenCV's, what canny ControlNets were trained on), a `depth` map (the endpoint's DEPTH_MODEL), or "
        "`openpose` body skeletons (found by PERSON_MODEL and POSE_MODEL, drawn as OpenPose draws them).",
    )
    low_threshold: int = Field(100, ge=1, le=255, description="canny: gradients below this are not edges.")
    high_threshold: int = Field(200, ge=1, le=255, description="canny: gradients above this are edges for sure.")
    scale: float = Field(1.0, ge=0, le=5, description="How strongly it steers (controlnet_conditioning_scale).")
    start: float = Field(0.0, ge=0, le=1, description="Fraction of the steps after which it starts steering.")
    end: float = Field(1.0, ge=0, le=1, description="Fraction of the steps after which it stops.")
    mode: int | None = Field(
        None, ge=0, le=63, description="A Union ControlNet's mode: which kind of control image this is, as the "
        "model card numbers them (FLUX.1 Union by InstantX / Shakker-Labs: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, "
        "5 gray, 6 low quality). Required by Union ControlNets, refused by the others.",
    )

    @model_validator(mode="after")
    def _in_order(self) -> ControlNetSpec:
        if self.start >= self.end:
            raise ValueError(f"start: must be below end ({self.end}), got {self.start}")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold: must not be above high_threshold ({self.high_threshold}), "
                             f"got {self.low_threshold}")
        thresholds = {"low_threshold", "high_threshold"} & self.model_fields_set
        if thresholds and self.preprocess != "canny":
            raise ValueError(f"{sorted(thresholds)[0]}: only with preprocess canny")
        return self


class IpAdapterSpec(Strict):
    """An IP-Adapter for one request: a reference image that steers like part of the prompt."""

    id: RepoOrPath = Field(
        ..., max_length=4096,
        description="Hub repo id (`org/name`, e.g. h94/IP-Adapter) or absolute path of a directory laid out like it.",
    )
    weight_name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.-]{1,100}(/[A-Za-z0-9_.-]{1,100}){0,3}\.safetensors$",
        description="The adapter's file in it, e.g. `models/ip-adapter_sd15.safetensors`.",
    )
    image_encoder: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,100}(/[A-Za-z0-9_.-]{1,100}){0,3}$",
        description="The CLIP image encoder's folder in it (default: `image_encoder` beside the weights).",
    )
    image: ImageSource = Field(..., description="The reference image: base64, `data:` URI or http(s) URL.")
    images: list[ImageSource] = Field(
        default_factory=list, max_length=7, description="More reference images, like `image`, steering together "
        "with it (several pictures of one face or style)."
    )
    scale: float = Field(1.0, ge=0, le=2, description="How strongly the image steers; 0 turns it off.")

    @field_validator("weight_name", "image_encoder")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        if value is not None and ".." in value.split("/"):
            raise ValueError(f"must stay inside the repo, got {value!r}")
        return value

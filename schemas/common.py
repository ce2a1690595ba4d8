"""What every request shares: its strict base, the model it names, operator limits, and the
value forms (hub ids and paths, revisions, s3:// URLs, input images), validated without torch."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Precision = Literal["fp32", "fp16", "bf16"]

# Hub repo ids: "org/name", each part letters, digits, "-", "_", "." (huggingface_hub's rule).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Hub revisions are git refs (branches, tags, refs/pr/N) or commit hashes; huggingface_hub uses
# them as paths in its cache (refs/<revision>), so nothing that could leave it: git's rule for
# ref names within these characters (no part empty or starting with ".", no "..", no ".lock").
_REVISION = re.compile(r"^(?!.*\.\.)(?!.*\.lock(/|$))[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")

_IMAGE_SOURCE = re.compile(r"^(https?://|data:)|^[A-Za-z0-9+/=\s_-]+$")

def _s3_only(value: str) -> str:
    if not value.startswith("s3://"):
        raise ValueError(f"must be an s3:// URL, got {value[:60]!r}")
    return value


S3Url = Annotated[str, AfterValidator(_s3_only)]


def _image_source(value: str) -> str:
    if not _IMAGE_SOURCE.match(value[:256]):
        raise ValueError("must be base64, a data: URI or an http(s):// URL")
    return value


ImageSource = Annotated[str, AfterValidator(_image_source)]  # an input image: base64, data: URI or URL


def _repo_or_path(value: str) -> str:
    if not (value.startswith("/") or _REPO_ID.match(value)):
        raise ValueError(f"must be a hub repo id like 'org/name' or an absolute path, got {value!r}")
    if ".." in value.split("/"):
        raise ValueError(f"must not contain '..', got {value!r}")
    return value


RepoOrPath = Annotated[str, AfterValidator(_repo_or_path)]  # a hub repo id, or a path on the worker

class Limits(BaseModel):
    """Caps the operator sets (see worker.settings); requests above them are refused."""

    max_pixels: int = 2048 * 2048
    max_images: int = 8
    max_steps: int = 150
    max_train_steps: int = 2000
    styles: dict[str, tuple[str, str]] = {}  # name: (prompt, negative prompt), from STYLES_FILE


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(Strict):
    """Which weights to run. Missing fields come from the environment (MODEL_ID ...)."""

    id: str | None = Field(
        None,
        max_length=4096,
        description="Hugging Face repo id (`org/name`) or absolute path of a diffusers directory.",
    )
    revision: str | None = Field(
        None, min_length=1, max_length=128, description="Hub branch, tag or commit (`main`, `v1.0`, `refs/pr/3`, "
        "a commit hash).",
    )
    variant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Weight file variant, e.g. `fp16`."
    )
    precision: Precision | None = Field(
        None, description="dtype the model runs in; default fp16 on CUDA, fp32 on CPU."
    )
    url: str | None = Field(
        None,
        max_length=8192,
        description="Archive (.tar.zst / .tar) of a diffusers model: https://, http://, s3://bucket/key, "
        "s3:///bucket/key, or bare s3:// (default bucket, conventional name). `#sha256=` verifies it.",
    )
    checkpoint_url: str | None = Field(
        None,
        max_length=8192,
        description="Single-file checkpoint (.safetensors, or .ckpt read as weights only), same URL forms as "
        "`url`; `id` names the diffusers model whose configs describe its architecture.",
    )
    t5: bool | None = Field(
        None, description="SD3: false loads the model without its T5-XXL text encoder (4.7 B parameters "
        "less; CLIP then reads the first 77 tokens of the prompt alone). Default: MODEL_T5 (true).",
    )

    @field_validator("revision")
    @classmethod
    def _ref_form(cls, value: str | None) -> str | None:
        if value is not None and not _REVISION.match(value):
            raise ValueError(f"must be a branch, tag or commit: parts of letters, digits, '-', '_' and '.' between "
                             f"'/', none starting with '.', no '..' (git's rule for ref names), got {value[:60]!r}")
        return value

    @field_validator("id")
    @classmethod
    def _id_form(cls, value: str | None) -> str | None:
        if value is None or value.startswith("/") or _REPO_ID.match(value):
            if value is not None and (".." in value.split("/") or "--" in value):
                raise ValueError(f"must not contain '..' or '--', got {value!r}")
            return value
        raise ValueError(f"must be a hub repo id like 'org/name' or an absolute path, got {value!r}")

"""What names a model: a request's ``model`` with the endpoint's defaults filled in.

Torch-free: start-up reads the default model's reference to fetch it while torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from schemas import ModelSpec

from ..errors import ModelSourceError
from ..settings import Settings

EMBEDDED_ID = "embedded:tiny-sd"


@dataclass(frozen=True)
class ModelRef:
    """Everything that makes two loaded pipelines different."""

    id: str  # EMBEDDED_ID, an absolute path, a hub repo id, or url:NAME for a file known only by its URL
    revision: str | None
    variant: str | None
    precision: str
    url: str | None = None  # an archive to fetch; ``id`` then names it
    checkpoint_url: str | None = None  # a single file to convert; ``id`` gives the configs, unless url:NAME
    t5: bool = True  # SD3's T5-XXL text encoder loaded (false: left on disk, or never fetched)
    # Nobody chose the precision: on CUDA the model's family picks its own (FLUX.1: bf16).
    precision_default: bool = False
    # The operator's MODEL_URL may point at private addresses; a request's may not.
    from_env: bool = field(default=False, compare=False)
    # A request's t5: false on a model without T5 is a mistake to answer; MODEL_T5's is not.
    t5_asked: bool = field(default=False, compare=False)


def model_ref(spec: ModelSpec, settings: Settings, device: str) -> ModelRef:
    """Fill what the request left out from the environment.

    Revision and variant describe MODEL_ID, so they apply only when the id comes from it too;
    precision is a choice about running, so MODEL_PRECISION applies to every model.
    """
    precision = spec.precision or settings.model_precision or ("fp16" if device == "cuda" else "fp32")
    t5 = settings.model_t5 if spec.t5 is None else spec.t5
    chosen = bool(spec.precision or settings.model_precision)
    return replace(_model_ref(spec, settings, precision), t5=t5, t5_asked=spec.t5 is not None,
                   precision_default=device == "cuda" and not chosen)


def load_precision(ref: ModelRef, family) -> str:
    """What ``ref``'s model loads in: as chosen, else (on CUDA) its family's own precision."""
    return family.cuda_precision if ref.precision_default and family is not None else ref.precision


def _model_ref(spec: ModelSpec, settings: Settings, precision: str) -> ModelRef:
    if spec.checkpoint_url or (spec.id is None and spec.url is None and settings.checkpoint_url):
        from_env = not spec.checkpoint_url
        checkpoint = spec.checkpoint_url or settings.checkpoint_url
        # The configs of model.id (for the operator's CHECKPOINT_URL, MODEL_ID); with none, the
        # checkpoint's own layout picks them (a url: id).
        if spec.id:
            config_id, revision = spec.id, spec.revision
        elif from_env and settings.model_id:
            config_id, revision = settings.model_id, settings.model_revision
        else:
            config_id, revision = url_name(checkpoint), None
        url = spec.url if spec.checkpoint_url else None  # an archive to publish it as, if missing
        return ModelRef(config_id, revision, None, precision, url, checkpoint_url=checkpoint, from_env=from_env)
    if spec.id is None and spec.url is None:  # the endpoint's default model
        revision = spec.revision or settings.model_revision
        variant = spec.variant or settings.model_variant
        if settings.model_url:
            if spec.revision and spec.revision != settings.model_revision:
                # Its archive holds one revision; another must not be fetched, nor published, as it.
                raise ModelSourceError("model.revision", "this endpoint's default model comes from its archive "
                                       "(MODEL_URL), one revision; name the model (model.id) to run another")
            model_id = settings.model_id or url_name(settings.model_url)
            return ModelRef(model_id, revision, variant, precision, settings.model_url, from_env=True)
        return ModelRef(settings.model_id or EMBEDDED_ID, revision, variant, precision)
    model_id = spec.id or url_name(spec.url)
    return ModelRef(model_id, spec.revision, spec.variant, precision, spec.url)


def url_name(url: str) -> str:
    """A name for a model known only by its URL, safe to report (no query, no credentials)."""
    return "url:" + url.split("#")[0].split("?")[0].rpartition("@")[2].rstrip("/").rsplit("/", 1)[-1]

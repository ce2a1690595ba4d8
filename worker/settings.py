"""Every environment variable the worker reads, typed and defaulted, in one place.

Everything else receives a ``Settings``; tests build one directly instead of patching the
environment. docs/configuration.md's table is generated from the fields here
(tools/docs_tables.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas import CacheSpec, Limits

RUNPOD_VOLUME = Path("/runpod-volume")


def _default_models_dir() -> Path:
    # A network volume outlives the worker, so models cached there survive cold starts.
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sd-worker"


class Settings(BaseSettings):
    # env_ignore_empty: Docker ENV lines and RunPod's form set variables to "" to mean unset.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    # --- The default model: used for whatever a request's `model` leaves out. ---
    model_id: str | None = Field(None, description="Hub repo id or local directory; unset: the embedded tiny model.")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag, commit) of MODEL_ID.")
    model_variant: str | None = Field(None, description="Weight variant of MODEL_ID, e.g. `fp16`.")
    model_precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="dtype every model runs in unless a request says; unset: on CUDA the family's own (bf16 for "
        "FLUX.1, FLUX.2, Z-Image and Qwen-Image, fp16 for the others), fp32 on CPU."
    )
    model_t5: bool = Field(True, description="SD3 models load their T5-XXL text encoder (a request's model.t5 wins).")
    model_url: str | None = Field(None, description="Archive of the default model (forms as model.url); trusted.")
    checkpoint_url: str | None = Field(None, description="Single-file checkpoint of the default model; trusted.")

    # --- Where models come from and go. ---
    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
                                       description="Hugging Face token for gated and private models.")
    models_dir: Path = Field(default_factory=_default_models_dir, description="The model cache: "
                             "/runpod-volume/models with a network volume, else ~/.cache/sd-worker.")
    hf_hub_cache: Path | None = Field(None, description="Where hub downloads go, as huggingface_hub reads it; "
                                      "unset: HF_HOME/hub if HF_HOME is set, else MODELS_DIR/hub.")
    hf_home: Path | None = Field(None, description="huggingface_hub's home: its hub/ folder is the hub cache "
                                 "where HF_HUB_CACHE is unset.")
    runpod_hf_cache: Path = Field(
        RUNPOD_VOLUME / "huggingface-cache" / "hub", description="RunPod's cached-models directory, read first."
    )
    hf_hub_offline: bool = Field(False, description="Never contact the hub; models must be cached.")
    baked_dir: Path = Field(Path("/baked-models"), description="Models baked into the image, checked first.")
    models_disk_budget_gb: float | None = Field(
        None, gt=0, description="Cap on archives and conversions in MODELS_DIR; least recently used go first."
    )

    # --- S3-compatible storage. boto3 also reads AWS_ENDPOINT_URL(_S3), AWS_PROFILE ... itself. ---
    aws_access_key_id: str | None = Field(None, description="S3 credentials (unset: boto3's own chain).")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 credentials (unset: boto3's own chain).")
    aws_default_region: str | None = Field(None, description="S3 region (unset: boto3's default).")
    aws_s3_endpoint_url: str | None = Field(None, description="docker-diffusers-api's name for the S3 endpoint.")
    aws_s3_default_bucket: str | None = Field(None, description="Bucket that a bare s3:// URL means.")
    write_destinations: str | None = Field(
        None, description="Where requests may write with the endpoint's credentials (uploads, convert, train, "
        "auto-publish): s3://bucket/prefix/ places, separated by spaces or commas; `none`: nowhere. Unset: all of "
        "AWS_S3_DEFAULT_BUCKET, if set.",
    )

    # --- Image uploads (output.upload_url, a job's s3Config): RunPod's names. Unset: the AWS_* above. ---
    bucket_endpoint_url: str | None = Field(None, description="S3 API endpoint for image uploads.")
    bucket_access_key_id: str | None = Field(None, description="Credentials for image uploads.")
    bucket_secret_access_key: SecretStr | None = Field(None, description="Credentials for image uploads.")
    output_url_expires_s: int = Field(
        7 * 24 * 3600, ge=0, le=7 * 24 * 3600, description="Life of the presigned link to each uploaded image; 0: none."
    )

    # --- Downloads of archives and checkpoints. ---
    download_concurrency: int = Field(8, ge=1, le=64, description="Parallel ranged requests per download.")
    download_chunk_mb: int = Field(16, ge=1, le=1024, description="Size of each ranged request.")
    download_retries: int = Field(5, ge=0, le=50, description="Retries per request after a dropped connection "
                                  "or a busy store (429, 5xx), with exponential backoff.")
    max_archive_bytes: int = Field(200 * 2**30, ge=1, description="Cap on the bytes an archive may extract to.")
    max_archive_members: int = Field(100_000, ge=1, description="Cap on the files an archive may hold.")

    # --- How the worker runs. ---
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Where models run; auto: CUDA if visible.")
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="For GPUs too small for a model (FLUX.1 on 24 GB cards): its weights stay in CPU RAM and "
        "move to the GPU as they are used: `model` a component at a time (diffusers' model CPU offload: a little "
        "slower), `sequential` a layer at a time (diffusers' leaf-level group offloading, with the next layer copied "
        "while one runs: the least memory, slower); `none`: all on the GPU."
    )
    compile: Literal["off", "regional", "full"] | None = Field(
        None, description="torch.compile of the denoiser: `regional` one repeated block, reused for the others "
        "(diffusers' compile_repeated_blocks); `full` the whole denoiser; unset: regional on CUDA, off on CPU. Each "
        "size compiles once per endpoint: the kernels are kept in MODELS_DIR/compile for every later worker."
    )
    quantize: Literal["none", "fp8", "int8"] = Field(
        "none", description="torchao weight quantization of DiT denoisers (SD3, FLUX.1, FLUX.2, Z-Image, Qwen-Image), "
        "once at load: `fp8` weights and activations in fp8 on GPUs that have it (compute capability 8.9+), int8 "
        "weight-only elsewhere; `int8` int8 weight-only. GGUF models run as they are."
    )
    cache: Annotated[CacheSpec | None, NoDecode] = Field(
        None, description="Step caching for requests that leave `cache` out, on models whose denoiser takes it: a "
        "method (`first_block`) or a request's `cache` object as JSON (`{\"method\": \"first_block\", "
        "\"threshold\": 0.08}`)."
    )
    max_loaded_models: int = Field(1, ge=1, description="Pipelines kept on the device across jobs.")
    max_loaded_gb: float | None = Field(None, gt=0, description="Cap on the weights kept on the device.")
    max_parked_models: int = Field(
        1, ge=0, description="CUDA: pipelines moved to CPU RAM when they leave the GPU, for fast switching back."
    )
    max_loaded_loras: int = Field(
        4, ge=1, le=64, description="LoRAs kept loaded on each warm model, least recently used out first."
    )
    max_loaded_controlnets: int = Field(
        2, ge=0, le=16, description="ControlNets kept on the device across jobs, least recently used out first."
    )
    max_loaded_vaes: int = Field(
        2, ge=1, le=16, description="Request-chosen VAEs kept on the device across jobs, least recently used out first."
    )
    max_loaded_ip_adapters: int = Field(
        1, ge=1, le=16, description="IP-Adapter image encoders kept on the device across jobs (and 4x as many "
        "adapters' weights in CPU RAM)."
    )
    depth_model: str = Field(
        "depth-anything/Depth-Anything-V2-Small-hf",
        description="Depth estimator for controlnets[i].preprocess depth: a hub id or a local directory.",
    )
    person_model: str = Field(
        "PekingU/rtdetr_r50vd_coco_o365",
        description="Person detector for controlnets[i].preprocess openpose (an object detector with a `person` "
        "class): a hub id or a local directory.",
    )
    pose_model: str = Field(
        "usyd-community/vitpose-base-simple",
        description="Pose estimator (ViTPose, COCO keypoints) for controlnets[i].preprocess openpose: a hub id or "
        "a local directory.",
    )
    max_batch_size: int = Field(
        4, ge=0, description="Images denoised together at most; more run in several batches (0: all at once)."
    )
    vae_tiling_pixels: int = Field(
        1536 * 1536, ge=0, description="Images over this many pixels go through the VAE in tiles (less GPU memory)."
    )
    preload_model: bool = Field(True, description="Load the default model at start-up, before the first job (with "
                                "COMPILE, and draw one image of its own size, compiling that shape).")
    streaming: bool = Field(True, description="false: the plain handler (a result dict; progress via "
                            "progress_update), for clients of docker-diffusers-api and RunPod's official workers.")
    safety_checker: bool = Field(True, description="Run a model's safety checker when it ships one.")
    allow_private_urls: bool = Field(False, description="Let request URLs reach private/loopback addresses.")
    local_output_dir: Path = Field(Path("output"), description="Where `python handler.py` writes images.")
    styles_file: Path | None = Field(
        None, description="AUTOMATIC1111's styles.csv (name, prompt, negative_prompt): the styles requests may name."
    )
    _styles: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)
    log_level: str = Field("INFO", description="The worker's log level.")
    runpod_log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = Field(
        "INFO", validation_alias=AliasChoices("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"),
        description="The SDK's log level; the SDK's own default, DEBUG, logs every job's input and output.",
    )
    progress_interval_s: float = Field(
        0.5, ge=0, description="STREAMING=false: least time between progress_update calls."
    )

    # --- Set by RunPod: which mode the SDK runs in (see handler.py). ---
    runpod_webhook_get_job: str | None = Field(None, description="Set on RunPod: the SDK's production job loop.")
    runpod_realtime_port: int = Field(0, description="Set on RunPod: the SDK's realtime mode.")

    # --- Caps on what one request may ask (the operator's cost control). ---
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="Cap on width x height.")
    max_images: int = Field(8, ge=1, le=64, description="Cap on num_images.")
    max_steps: int = Field(150, ge=1, le=1000, description="Cap on num_inference_steps.")
    max_train_steps: int = Field(2000, ge=1, le=100_000, description="Cap on train.max_train_steps.")
    max_input_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest input image download.")
    url_timeout_s: float = Field(30, gt=0, description="Request URLs: the longest wait for a connection or a read.")
    url_deadline_s: float = Field(
        60, gt=0, description="Request URLs: the time a whole download may take, plus its size at URL_MIN_MB_PER_S."
    )
    url_min_mb_per_s: float = Field(
        2, ge=0, description="Request URLs: the least average speed (MB/s) a big download keeps after "
        "URL_DEADLINE_S; 0: every download ends within URL_DEADLINE_S.",
    )
    # RunPod loses results over about 20 MB without a word: refuse them with a reason instead.
    max_result_bytes: int = Field(19 * 1024 * 1024, ge=1024, description="Largest base64 result a job may return.")

    @property
    def on_runpod(self) -> bool:
        return self.runpod_webhook_get_job is not None

    @property
    def limits(self) -> Limits:
        return Limits(
            max_pixels=self.max_pixels, max_images=self.max_images, max_steps=self.max_steps,
            max_train_steps=self.max_train_steps, styles=self._styles,
        )

    @property
    def write_places(self) -> list[tuple[str, str]]:
        """WRITE_DESTINATIONS as (bucket, key prefix) pairs; a prefix is "" or ends in "/"."""
        if self.write_destinations is None:
            return [(self.aws_s3_default_bucket, "")] if self.aws_s3_default_bucket else []
        return [_place(item) for item in self.write_destinations.replace(",", " ").split() if item != "none"]

    @field_validator("cache", mode="before")
    @classmethod
    def _read_cache(cls, value: object) -> object:
        """CACHE: a method's name, or a request's ``cache`` object as JSON."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("{"):
                try:
                    return json.loads(value)
                except ValueError:
                    raise ValueError("CACHE: not a JSON object") from None
            return {"method": value} if value and value not in ("off", "none") else None
        return value

    @model_validator(mode="after")
    def _read_places(self) -> Settings:
        self.write_places  # a malformed WRITE_DESTINATIONS fails the worker at start-up
        return self

    @model_validator(mode="after")
    def _read_styles(self) -> Settings:
        """Read STYLES_FILE once, at start-up: a file that cannot serve fails the worker there."""
        if self.styles_file is not None:
            self._styles = read_styles(self.styles_file)
        return self

    @property
    def hub_cache(self) -> Path:
        """Where hub models are cached: huggingface_hub's own conventions where the endpoint
        sets them (HF_HUB_CACHE, else HF_HOME/hub), MODELS_DIR/hub otherwise."""
        if self.hf_hub_cache:
            return self.hf_hub_cache
        return self.hf_home / "hub" if self.hf_home else self.models_dir / "hub"

    def secrets(self) -> list[str]:
        """Values that must never appear in an answer or a log line."""
        found = [
            s.get_secret_value()
            for s in (self.hf_token, self.aws_secret_access_key, self.bucket_secret_access_key) if s
        ]
        for name in ("AWS_SESSION_TOKEN", "RUNPOD_AI_API_KEY"):
            if os.environ.get(name):
                found.append(os.environ[name])
        return [s for s in found if len(s) >= 4]


def _place(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` (or ``s3://bucket``) as (bucket, prefix)."""
    bucket, _, prefix = url.removeprefix("s3://").lstrip("/").partition("/")  # (s3:///bucket/: the same)
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if not url.startswith("s3://") or not bucket or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"WRITE_DESTINATIONS: {url!r} is not an s3://bucket/prefix/ place")
    return bucket, "".join(f"{p}/" for p in parts)


def read_styles(path: Path) -> dict[str, tuple[str, str]]:
    """AUTOMATIC1111's styles.csv: a header naming ``name``, ``prompt`` and ``negative_prompt``
    (as its web UI writes it), then one style a row. Rows without a name are skipped."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"STYLES_FILE: cannot read {path} ({type(exc).__name__})") from None
    if rows and "name" not in rows[0]:
        raise ValueError(f"STYLES_FILE: {path} has no 'name' column "
                         "(AUTOMATIC1111's header: name,prompt,negative_prompt)")
    return {row["name"].strip(): ((row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
            for row in rows if (row.get("name") or "").strip()}

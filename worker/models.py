"""Where a model's weights are, and the loaded pipelines kept warm across jobs.

``ModelStore`` is the one owner of loaded pipelines. A request's ``model`` becomes a
``ModelRef`` (env defaults filled in); the store answers from memory when it can, else finds
the weights and loads them, in this order:

0. baked into the image at build (builder/download.py), listed in BAKED_DIR/baked.json
   (``baked``): no network at all;
1. a ``url``: an archive already installed in MODELS_DIR (``cache``), else streamed from
   S3 or HTTP and installed there (``url``); missing on S3 but with another source (``id``,
   ``checkpoint_url``), built from it and published there first (auto-publish);
2. a ``checkpoint_url``: its conversion installed in MODELS_DIR (``cache``), else fetched and
   converted with the configs of ``id``, or without one of the reference model for its layout
   (``checkpoint``);
3. no id anywhere: the embedded tiny model, built on first use (source ``embedded``);
4. an absolute path: a local diffusers directory (``local``);
5. a hub id: RunPod's cached-models directory, then our hub cache (``cache``), then a
   download from the hub into our cache (``hub``).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from schemas import ModelSpec, Progress

from . import families
from .errors import ModelSourceError, first_line
from .families import Family
from .precision import dtype as precision_dtype
from .settings import Settings
from .sources import archives
from .sources.cache import DiskCache, entry_key
from .sources.checkpoints import fetch_checkpoint, missing_parts, reference_model
from .sources.storage import Location, ObjectMissing, open_download, parse_location
from .timing import ms_since

log = logging.getLogger(__name__)

EMBEDDED_ID = "embedded:tiny-sd"
FETCHED_NOW = ("hub", "url", "checkpoint")  # sources whose locate step downloaded something


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
    # The operator's MODEL_URL may point at private addresses; a request's may not.
    from_env: bool = field(default=False, compare=False)
    # A request's t5: false on a model without T5 is a mistake to answer; MODEL_T5's is not.
    t5_asked: bool = field(default=False, compare=False)


@dataclass
class Loaded:
    ref: ModelRef
    pipeline: Any  # a diffusers DiffusionPipeline
    family: Family  # worked out once, at load
    # LoRAs resident on its modules, least recently used first: file identity -> adapter name.
    loras: OrderedDict[str, str] = field(default_factory=OrderedDict)


def model_ref(spec: ModelSpec, settings: Settings, device: str) -> ModelRef:
    """Fill what the request left out from the environment.

    Revision and variant describe MODEL_ID, so they apply only when the id comes from it too;
    precision is a choice about running, so MODEL_PRECISION applies to every model.
    """
    precision = spec.precision or settings.model_precision or ("fp16" if device == "cuda" else "fp32")
    t5 = settings.model_t5 if spec.t5 is None else spec.t5
    return replace(_model_ref(spec, settings, precision), t5=t5, t5_asked=spec.t5 is not None)


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
            config_id, revision = _url_name(checkpoint), None
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
            model_id = settings.model_id or _url_name(settings.model_url)
            return ModelRef(model_id, revision, variant, precision, settings.model_url, from_env=True)
        return ModelRef(settings.model_id or EMBEDDED_ID, revision, variant, precision)
    model_id = spec.id or _url_name(spec.url)
    return ModelRef(model_id, spec.revision, spec.variant, precision, spec.url)


def _url_name(url: str) -> str:
    """A name for a model known only by its URL, safe to report (no query, no credentials)."""
    return "url:" + url.split("#")[0].split("?")[0].rpartition("@")[2].rstrip("/").rsplit("/", 1)[-1]


BAKED_MANIFEST = "baked.json"


def baked_entry(ref: ModelRef) -> dict:
    """How a baked model is listed in the manifest: what identifies it, not how it runs."""
    entry = {"id": ref.id, "revision": ref.revision, "variant": ref.variant, "url": ref.url}
    return entry | ({"checkpoint_url": ref.checkpoint_url} if ref.checkpoint_url else {})


def read_baked(baked_dir: Path) -> list[dict]:
    manifest = baked_dir / BAKED_MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else []


def find_baked(ref: ModelRef, baked: list[dict], baked_dir: Path) -> Path | None:
    wanted = baked_entry(ref)
    for entry in baked:
        if {k: entry.get(k) for k in wanted} == wanted:
            return baked_dir / entry["path"]
    return None


def archive_location(ref: ModelRef, settings: Settings) -> Location:
    field = "MODEL_URL" if ref.from_env else "model.url"
    model_id = None if ref.id.startswith("url:") else ref.id
    return parse_location(ref.url, field, settings, model_id, ref.precision)


Publisher = Callable[[Path, Location], tuple[Path, str]]


def fetch_archive(
    ref: ModelRef, settings: Settings, disk: DiskCache, emit: Callable[[Progress], None],
    publish_missing: Publisher | None = None,
) -> tuple[Path, str]:
    """The installed directory of ``ref.url``'s archive, fetching it first if needed.

    If the archive does not exist on S3 and ``publish_missing`` is given, that builds and
    uploads it into the staging directory (docker-diffusers-api's flow) and the result is
    installed like a download; the source reported is where its weights came from.
    Torch-free without a publisher, so start-up can run it while torch imports."""
    field = "MODEL_URL" if ref.from_env else "model.url"
    location = archive_location(ref, settings)
    key = entry_key(location.name, f"{location.display}#{location.sha256 or ''}")

    source = "url"

    def build(staging: Path) -> Path:
        nonlocal source
        try:
            download = open_download(location, field, settings, trusted=ref.from_env)
        except ObjectMissing:
            if publish_missing is None:
                raise
            saved, source = publish_missing(staging, location)
            return saved
        with download:
            expected = location.sha256 or download.sidecar_sha256()
            log.info("fetching %s (%s bytes, sha256 %s)", location.display, download.size, expected or "unknown")
            archives.extract(
                download.chunks(), staging, field=field, expected_sha256=expected, expected_size=download.size,
                max_bytes=settings.max_archive_bytes, max_members=settings.max_archive_members,
                on_bytes=archives.byte_progress(emit, "download", download.size),
            )
        return archives.model_root(staging, field)

    path, fetched = disk.obtain("archives", key, build)
    return path, source if fetched else "cache"


def check_t5(ref: ModelRef, family: Family | None) -> None:
    """A request's ``t5: false`` on a model without T5 is a mistake to answer."""
    if ref.t5_asked and not ref.t5 and not (family and family.optional_t5):
        with_t5 = " and ".join(f.name for f in families.FAMILIES if f.optional_t5)
        raise ModelSourceError("model.t5", f"{ref.id} has no T5 encoder to leave out (only {with_t5} models do)")


def _t5_listed(path: Path) -> list[str]:
    """The T5 encoder the model in ``path`` lists, if its family has one to leave out."""
    index = families.read_index(path) or {}
    family = families.from_components(families.components(index))
    encoder = family.optional_t5[0] if family and family.optional_t5 else None
    return [encoder] if encoder and (index.get(encoder) or [None, None])[1] else []


def load_pipeline(path: Path, precision: str, variant: str | None, device: str, t5: bool = True) -> Any:
    """``t5``: false leaves the model's T5 out, where its family has one to leave."""
    from diffusers import DiffusionPipeline

    family = families.at(path)
    leave_out = family.without_t5() if family and not t5 else {}
    dtype = precision_dtype(precision)
    try:
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant, local_files_only=True,
                                                     **leave_out)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        detail = first_line(exc)
        with_variant = f" (variant {variant!r})" if variant else ""
        raise ModelSourceError("model.id", f"{type(exc).__name__}{with_variant}: {detail}") from None
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    _text_model_alias(pipeline)
    return pipeline


def _text_model_alias(pipeline: Any) -> None:
    """diffusers 0.42 applies ``clip_skip`` through ``text_encoder.text_model.final_layer_norm``;
    transformers 5 moved that layer to ``text_encoder.final_layer_norm``. A plain attribute (not
    a registered module: nothing is saved or moved twice) lets the old path find it."""
    from types import SimpleNamespace

    encoder = getattr(pipeline, "text_encoder", None)
    if encoder is not None and hasattr(encoder, "final_layer_norm") and not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


def _weight_bytes(loaded: Loaded) -> int:
    modules = [c for c in loaded.pipeline.components.values() if hasattr(c, "parameters")]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class ModelStore:
    """Loaded pipelines, least recently used first out beyond MAX_LOADED_MODELS / MAX_LOADED_GB.

    On CUDA a pipeline leaving the GPU is parked in CPU RAM (up to MAX_PARKED_MODELS), so
    switching back costs a host-to-device copy instead of a load from disk."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.device = device
        self.disk = DiskCache(settings)
        self.baked = read_baked(settings.baked_dir)
        self._loaded: OrderedDict[ModelRef, Loaded] = OrderedDict()  # on self.device
        self._parked: OrderedDict[ModelRef, Loaded] = OrderedDict()  # in CPU RAM, CUDA only

    def get(self, ref: ModelRef, emit: Callable[[Progress], None], timings: dict[str, float]) -> tuple[Loaded, str]:
        """The pipeline for ``ref`` and where it came from for this job (``memory`` if warm)."""
        if ref in self._loaded:
            self._loaded.move_to_end(ref)
            return self._loaded[ref], "memory"
        emit(Progress(stage="load", step=0, total=1))
        start = time.perf_counter()
        # Taken out of the parked set first: making room below parks other pipelines, and with
        # MAX_PARKED_MODELS reached that would drop the very one this job is switching back to.
        parked = self._parked.pop(ref, None)
        path, source = (None, "memory") if parked is not None else self._locate(ref, emit)
        if source in FETCHED_NOW:  # for archives, extraction overlaps the download
            timings["download"] = ms_since(start)
            start = time.perf_counter()
        # Make room once the weights are found (a bad request must not evict the warm model),
        # and before loading (next to a model about to leave, it could run out of memory).
        while len(self._loaded) >= self.settings.max_loaded_models:
            self._evict()
        if parked is not None:
            loaded = parked
            loaded.pipeline.to(self.device)
        else:
            loaded = self._load(path, ref)
        timings["load"] = ms_since(start)
        emit(Progress(stage="load", step=1, total=1))
        self._loaded[ref] = loaded
        budget = self.settings.max_loaded_gb
        while budget and len(self._loaded) > 1 and sum(map(_weight_bytes, self._loaded.values())) > budget * 2**30:
            self._evict()
        log.info("loaded %s from %s in %.0f ms", ref.id, source, timings["load"])
        return loaded, source

    def loaded(self) -> list[Loaded]:
        """The pipelines on the device, least recently used first."""
        return list(self._loaded.values())

    def clear_device(self) -> None:
        """Free the GPU for a job that needs all of it (training): warm pipelines are parked in
        CPU RAM (up to MAX_PARKED_MODELS), so the next inference gets them back without the disk."""
        if self.device == "cuda":
            while self._loaded:
                self._evict()

    def _evict(self) -> None:
        """Move the least recently used pipeline off the device: parked in CPU RAM, or dropped."""
        ref, loaded = self._loaded.popitem(last=False)
        if self.device != "cpu" and self.settings.max_parked_models > 0:
            loaded.pipeline.to("cpu")
            self._parked[ref] = loaded
            while len(self._parked) > self.settings.max_parked_models:
                self._parked.popitem(last=False)
        del loaded
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- Finding the weights ---

    def _locate(self, ref: ModelRef, emit: Callable[[Progress], None]) -> tuple[Path, str]:
        if baked := find_baked(ref, self.baked, self.settings.baked_dir):
            return baked, "baked"
        if ref.url:
            return fetch_archive(ref, self.settings, self.disk, emit, self._publisher(ref, emit))
        if ref.checkpoint_url:
            field = "CHECKPOINT_URL" if ref.from_env else "model.checkpoint_url"
            if ref.id.startswith("url:"):
                config_key = "layout"

                def configs(weights: Path) -> Path:
                    reference = reference_model(weights, field)
                    try:
                        return self._configs(ModelRef(reference, None, None, ref.precision), emit,
                                             missing_parts(weights, ref.t5))
                    except ModelSourceError as exc:
                        detail = str(exc).partition(": ")[2]
                        raise ModelSourceError(
                            field, f"its layout takes the configs of {reference}: {detail}") from None
            else:
                config_key = f"{ref.id}@{ref.revision}"
                config_ref = ModelRef(ref.id, ref.revision, None, ref.precision)
                self._configs(config_ref, emit)  # a wrong model.id fails before the download

                def configs(weights: Path) -> Path:
                    return self._configs(config_ref, emit, missing_parts(weights, ref.t5))
            return fetch_checkpoint(
                ref.checkpoint_url, field=field, trusted=ref.from_env, configs=configs, config_key=config_key,
                precision=ref.precision, settings=self.settings, disk=self.disk, emit=emit, t5=ref.t5,
                guessed=ref.id.startswith("url:"),
            )
        if ref.id == EMBEDDED_ID:
            from builder import tiny_model

            out = self.settings.models_dir / "embedded" / f"{tiny_model.NAME}-v{tiny_model.VERSION}"
            return tiny_model.ensure(out), "embedded"
        if ref.id.startswith("/"):
            path = Path(ref.id)
            if not (path / "model_index.json").is_file():
                raise ModelSourceError("model.id", f"no diffusers model at {ref.id} (model_index.json missing)")
            return path, "local"
        return self._from_hub(ref, emit)

    def _configs(self, ref: ModelRef, emit: Callable[[Progress], None], parts: list[str] = ()) -> Path:
        """A diffusers directory with ``ref``'s configs, and the weights of ``parts`` (what a
        checkpoint lacks): from the hub, just those."""
        if ref.id.startswith("/") or ref.id == EMBEDDED_ID:
            return self._locate(ref, emit)[0]
        return self._from_hub(ref, emit, configs_only=True, parts=parts)[0]

    def locate(self, ref: ModelRef, emit: Callable[[Progress], None]) -> tuple[Path, str]:
        """Where ``ref``'s weights are on disk (fetching them if needed), and where they came from."""
        return self._locate(ref, emit)

    def _publisher(self, ref: ModelRef, emit: Callable[[Progress], None]) -> Publisher | None:
        """For an archive that does not exist yet: build it from the model's other source."""
        source_ref = replace(ref, url=None)
        if not ref.checkpoint_url and (ref.id.startswith("url:") or ref.id == EMBEDDED_ID):
            return None  # nothing to build it from

        def publish_missing(staging: Path, location: Location) -> tuple[Path, str]:
            from .sources.destinations import ObjectExists, check_writable, hub_names
            from .sources.publish import export

            field = "MODEL_URL" if ref.from_env else "model.url"
            if not ref.from_env:  # a request's: where the operator lets it, a hub model's name from the hub only
                from_hub = not (ref.checkpoint_url or ref.revision)
                suffix = ".tar" if location.name.endswith(".tar") else ".tar.zst"
                check_writable(location, field, self.settings,
                               publishes=hub_names(ref.id, ref.precision, suffix, from_hub=from_hub, lean=False))
            path, source = self._locate(source_ref, emit)
            try:
                saved, out = export(path, ref.variant, location, ref.precision, staging=staging, settings=self.settings,
                                    field=field, emit=emit, timings={})
            except ObjectExists:  # another worker published it meanwhile: ours is the same, and saved
                log.info("%s was published meanwhile by another worker", location.display)
                return staging / "model", source
            log.info("published %s as %s (%d bytes, sha256 %s)", ref.id, out.url, out.size_bytes, out.sha256)
            return saved, source

        return publish_missing

    def _from_hub(
        self, ref: ModelRef, emit: Callable[[Progress], None], configs_only: bool = False, parts: list[str] = ()
    ) -> tuple[Path, str]:
        """The model's snapshot in a hub cache, downloading it if need be.

        ``configs_only``: just what describes the architecture (what a checkpoint's conversion
        needs), not gigabytes of weights the checkpoint replaces."""
        from diffusers import DiffusionPipeline
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download

        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        options = dict(revision=ref.revision, variant=ref.variant, token=token,
                       **({} if ref.t5 else families.without_t5()))
        if configs_only:
            patterns = ["*.json", "*.txt", "*.model", *(f"{part}/*" for part in parts)]
            options = dict(revision=ref.revision, token=token, allow_patterns=patterns)
        download = snapshot_download if configs_only else DiffusionPipeline.download
        for cache in (self.settings.runpod_hf_cache, self.settings.hub_cache):
            if cache.is_dir():
                try:
                    path = Path(download(ref.id, cache_dir=cache, local_files_only=True, **options))
                except (hub_errors.LocalEntryNotFoundError, FileNotFoundError):
                    continue
                # A cached snapshot may hold only the configs of an earlier conversion, or an SD3
                # model without the T5 that this request wants.
                wanted = parts if configs_only else (_t5_listed(path) if ref.t5 else [])
                if all(any((path / part).glob("*.safetensors")) for part in wanted):
                    return path, "cache"
        if self.settings.hf_hub_offline:
            raise ModelSourceError("model.id", f"{ref.id} is not cached on this worker and HF_HUB_OFFLINE is set")
        emit(Progress(stage="download", step=0, total=1))
        try:
            path = download(ref.id, cache_dir=self.settings.hub_cache, **options)
        except hub_errors.GatedRepoError:
            raise ModelSourceError("model.id", f"{ref.id} is gated: HF_TOKEN must belong to an account with access")
        except hub_errors.RepositoryNotFoundError:
            raise ModelSourceError("model.id", f"{ref.id} not found on the hub (if private, set HF_TOKEN)")
        except hub_errors.RevisionNotFoundError:
            raise ModelSourceError("model.revision", f"{ref.revision!r} not found in {ref.id}")
        except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelSourceError("model.id", f"could not download {ref.id} ({type(exc).__name__})") from None
        emit(Progress(stage="download", step=1, total=1))
        return Path(path), "hub"

    # --- Loading ---

    def _load(self, path: Path, ref: ModelRef) -> Loaded:
        def failed(exc: ModelSourceError) -> ModelSourceError:
            return ModelSourceError(exc.field, f"could not load {ref.id}: {str(exc).partition(': ')[2]}")

        try:
            family = families.at(path)  # a model this worker cannot run is refused before loading
        except ModelSourceError as exc:
            raise failed(exc) from None
        check_t5(ref, family)
        try:
            pipeline = load_pipeline(path, ref.precision, ref.variant, self.device, ref.t5)
        except ModelSourceError as exc:
            raise failed(exc) from None
        family = families.of_pipeline(pipeline)
        if family is None:  # its index named classes of ours, but what loaded is not one of our models
            raise ModelSourceError("model.id", f"could not load {ref.id}: {type(pipeline).__name__} is not a model "
                                               "this worker runs")
        return Loaded(ref, pipeline, family)

"""Where a model's weights are on local disk, fetched or built there if need be.

``Locator.locate`` finds them, in this order:

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

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from schemas import ModelSpec, Progress

from .. import families
from ..errors import ModelSourceError
from ..settings import Settings
from . import archives, fetches, hub
from .cache import DiskCache, entry_key
from .checkpoints import fetch_checkpoint, missing_parts, reference_model
from .refs import EMBEDDED_ID, ModelRef, model_ref
from .storage import Location, ObjectMissing, open_download, parse_location

log = logging.getLogger(__name__)

FETCHED_NOW = ("hub", "url", "checkpoint")  # sources whose locate step downloaded something
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


def archive_key(ref: ModelRef, settings: Settings) -> str:
    """The archive's entry in MODELS_DIR/archives: its location and digest."""
    location = archive_location(ref, settings)
    return entry_key(location.name, f"{location.display}#{location.sha256 or ''}")


def fetch_archive(
    ref: ModelRef, settings: Settings, disk: DiskCache, emit: Callable[[Progress], None],
    publish_missing: Publisher | None = None, watch: Callable[[Path, int, int, bool], None] | None = None,
) -> tuple[Path, str]:
    """The installed directory of ``ref.url``'s archive, fetching it first if needed.

    If the archive does not exist on S3 and ``publish_missing`` is given, that builds and
    uploads it into the staging directory (docker-diffusers-api's flow) and the result is
    installed like a download; the source reported is where its weights came from. ``watch``
    hears of each file as it is written (its path in the staging directory).
    Torch-free without a publisher, so start-up can run it while torch imports."""
    field = "MODEL_URL" if ref.from_env else "model.url"
    location = archive_location(ref, settings)
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
            free = shutil.disk_usage(staging).free
            if download.size and download.size > free:  # (it extracts to at least its own size)
                raise ModelSourceError(field, f"the archive is {download.size / 1e9:.2f} GB and MODELS_DIR has "
                                       f"{free / 1e9:.2f} GB free")
            expected = location.sha256 or download.sidecar_sha256()
            log.info("fetching %s (%s bytes, sha256 %s)", location.display, download.size, expected or "unknown")
            archives.extract(
                download.chunks(), staging, field=field, expected_sha256=expected, expected_size=download.size,
                max_bytes=settings.max_archive_bytes, max_members=settings.max_archive_members,
                on_bytes=archives.byte_progress(emit, "download", download.size),
                watch=watch and (lambda name, written, size, done: watch(staging / name, written, size, done)),
            )
        return archives.model_root(staging, field)

    path, fetched = disk.obtain("archives", archive_key(ref, settings), build)
    return path, source if fetched else "cache"


def _fetch_here(ref: ModelRef, settings: Settings, *, emit: Callable[[Progress], None],
                watch: Callable[[Path, int, int, bool], None]) -> tuple[Path, str]:
    """fetch_archive in a fetching process (fetches.in_child)."""
    return fetch_archive(ref, settings, DiskCache(settings), emit, watch=watch)


def start_fetch(
    ref: ModelRef, settings: Settings, disk: DiskCache, baked: list[dict] | None = None,
) -> fetches.Fetch | None:
    """The fetch of ``ref``'s archive, joined if in flight, else started (torch-free; see fetches
    for where it runs); None when there is nothing to fetch: no archive, baked, or installed already."""
    if not ref.url:
        return None
    if find_baked(ref, read_baked(settings.baked_dir) if baked is None else baked, settings.baked_dir):
        return None
    key = archive_key(ref, settings)

    def run(fetch: fetches.Fetch) -> tuple[Path, str]:
        if fetches.still_starting():  # (see fetches: imports would starve a fetching thread)
            return fetches.in_child(fetch, _fetch_here, ref, settings)
        return fetch_archive(ref, settings, disk, fetch.emit, watch=fetch.watch)

    return fetches.begin(key, run, installed=disk.path("archives", key).is_dir)


class Locator:
    """Finds models' weights for one worker (its caches, its baked models)."""

    def __init__(self, settings: Settings, disk: DiskCache | None = None):
        self.settings = settings
        self.disk = disk or DiskCache(settings)
        self.baked = read_baked(settings.baked_dir)

    def locate(self, ref: ModelRef, emit: Callable[[Progress], None]) -> tuple[Path, str]:
        if baked := find_baked(ref, self.baked, self.settings.baked_dir):
            return baked, "baked"
        if ref.url:
            if fetch := self.fetching(ref):
                try:
                    fetch.listen(emit)
                    return fetch.take()
                except ObjectMissing as missing:
                    return self.build_missing(ref, emit, missing)
            return fetch_archive(ref, self.settings, self.disk, emit)
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

    def fetching(self, ref: ModelRef) -> fetches.Fetch | None:
        """The fetch of ``ref``'s archive, in flight or started now; None if there is none to run."""
        return start_fetch(ref, self.settings, self.disk, self.baked)

    def build_missing(self, ref: ModelRef, emit: Callable[[Progress], None],
                      missing: ObjectMissing) -> tuple[Path, str]:
        """An archive ``missing`` on S3: built from the model's other source and published there,
        then installed (docker-diffusers-api's flow); ``missing`` raised if it has no other source."""
        if (publisher := self._publisher(ref, emit)) is None:
            raise missing
        return fetch_archive(ref, self.settings, self.disk, emit, publisher)

    def _configs(self, ref: ModelRef, emit: Callable[[Progress], None], parts: list[str] = ()) -> Path:
        """A diffusers directory with ``ref``'s configs, and the weights of ``parts`` (what a
        checkpoint lacks): from the hub, just those."""
        if ref.id.startswith("/") or ref.id == EMBEDDED_ID:
            return self.locate(ref, emit)[0]
        return self._from_hub(ref, emit, configs_only=True, parts=parts)[0]

    def _publisher(self, ref: ModelRef, emit: Callable[[Progress], None]) -> Publisher | None:
        """For an archive that does not exist yet: build it from the model's other source."""
        source_ref = replace(ref, url=None)
        if not ref.checkpoint_url and (ref.id.startswith("url:") or ref.id == EMBEDDED_ID):
            return None  # nothing to build it from

        def publish_missing(staging: Path, location: Location) -> tuple[Path, str]:
            from .destinations import ObjectExists, check_writable, hub_names
            from .publish import export

            field = "MODEL_URL" if ref.from_env else "model.url"
            if not ref.from_env:  # a request's: where the operator lets it, a hub model's name from the hub only
                from_hub = not (ref.checkpoint_url or ref.revision)
                suffix = ".tar" if location.name.endswith(".tar") else ".tar.zst"
                check_writable(location, field, self.settings,
                               publishes=hub_names(ref.id, ref.precision, suffix, from_hub=from_hub, lean=False))
            path, source = self.locate(source_ref, emit)
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

        if configs_only:
            patterns = ["*.json", "*.txt", "*.model", *(f"{part}/*" for part in parts)]
            options = dict(revision=ref.revision, allow_patterns=patterns)
        else:
            options = dict(revision=ref.revision, variant=ref.variant, fetch=DiffusionPipeline.download,
                           **({} if ref.t5 else families.without_t5()))

        def usable(path: Path) -> bool:
            # A cached snapshot may hold only the configs of an earlier conversion, or a model
            # without the T5 that this request wants.
            wanted = parts if configs_only else (families.t5_listed(path) if ref.t5 else [])
            return all(any((path / part).glob("*.safetensors")) for part in wanted)

        return hub.snapshot(ref.id, "model.id", self.settings, usable=usable, emit=emit, **options)


def prefetch(spec: ModelSpec, settings: Settings, disk: DiskCache | None = None,
             warm: Callable[[ModelRef], bool] | None = None) -> fetches.Fetch | None:
    """Start fetching the archive of ``spec`` (a request's ``model``, or the default model's
    MODEL_URL) now, torch-free, so it arrives while torch imports; the job that needs it joins
    the fetch. Nothing if there is no archive, it is baked or installed, the model is ``warm``
    in memory (its archive may have left the disk: it is not needed), or which archive it is
    depends on the device (known only after torch: the precision default, and with it a bare
    s3:// name). A missing archive is left to the job, which builds and publishes it."""
    on_gpu, on_cpu = (model_ref(spec, settings, device) for device in ("cuda", "cpu"))
    if not on_gpu.url or archive_location(on_gpu, settings) != archive_location(on_cpu, settings):
        return None
    if warm and (warm(on_gpu) or warm(on_cpu)):
        return None
    return start_fetch(on_gpu, settings, disk or DiskCache(settings))

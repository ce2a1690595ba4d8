"""Bake the default model into the image at build time (Dockerfile.build-download).

Fetches what the worker would fetch for a request with no ``model``, from the same variables
(``MODEL_ID``, ``MODEL_REVISION``, ``MODEL_VARIANT``, ``MODEL_PRECISION``, ``MODEL_URL``,
``CHECKPOINT_URL``),
into ``BAKED_DIR``, and lists it in ``BAKED_DIR/baked.json``. The worker checks that list
before anything else, so a baked model loads with no network at all.

Credentials come from BuildKit secrets mounted for this step only (see the Dockerfile); they
never reach a layer.

    MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5 python -m builder.download
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bake(settings) -> Path:
    """Fetch the default model into ``settings.baked_dir``; return where it landed."""
    from schemas import ModelSpec, Progress
    from worker.errors import WorkerError
    from worker.sources.locate import BAKED_MANIFEST, Locator, baked_entry, read_baked
    from worker.sources.refs import EMBEDDED_ID, model_ref

    baked = settings.baked_dir
    # Fetch into the baked directory itself, never via RunPod's volume cache.
    build = settings.model_copy(update={
        "models_dir": baked, "hf_hub_cache": baked / "hub", "runpod_hf_cache": baked / ".no-volume",
        "baked_dir": baked / ".none",
    })
    ref = model_ref(ModelSpec(), build, device="cuda")  # the image runs on a GPU: fp16 unless set
    if ref.id == EMBEDDED_ID and not ref.url:
        raise SystemExit("builder.download: set MODEL_ID or MODEL_URL to bake a model")

    def show(event: Progress) -> None:
        if event.stage == "download" and event.total:
            print(f"\r{event.step / 2**20:9.1f} / {event.total / 2**20:.1f} MB", end="", flush=True)

    try:
        path, source = Locator(build).locate(ref, show)
    except WorkerError as exc:
        raise SystemExit(f"builder.download: {exc}") from None
    print(f"\nbaked {ref.id} ({source}) at {path}")
    entries = [e for e in read_baked(baked) if {k: e.get(k) for k in baked_entry(ref)} != baked_entry(ref)]
    entries.append(baked_entry(ref) | {"path": str(path.relative_to(baked))})
    (baked / BAKED_MANIFEST).write_text(json.dumps(entries, indent=2))
    return path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from worker.settings import Settings

    bake(Settings())


if __name__ == "__main__":
    main()

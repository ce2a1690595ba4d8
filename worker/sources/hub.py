"""The Hugging Face hub: one way to find a repo's files, for models and for the files parts
name by hub id (LoRAs, embeddings).

RunPod's cached models (``RUNPOD_HF_CACHE``) come first, then our hub cache under MODELS_DIR;
only then the network, into our hub cache, unless HF_HUB_OFFLINE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from schemas import Progress

from ..errors import ModelSourceError
from ..settings import Settings


def snapshot(repo_id: str, field: str, settings: Settings, *, fetch: Callable | None = None,
             usable: Callable[[Path], bool] = lambda path: True, emit: Callable[[Progress], None] | None = None,
             **options) -> tuple[Path, str]:
    """The repo's snapshot on local disk and where it came from (``cache`` or ``hub``).

    ``fetch``: how to get it (huggingface_hub's ``snapshot_download`` unless given, e.g.
    diffusers' ``DiffusionPipeline.download``), with ``options`` (revision, allow_patterns ...).
    ``usable``: whether a cached snapshot has what the caller needs (one may hold only the
    configs of an earlier conversion); if not, the next cache is tried, then the network.
    ``emit``: download progress, start and end. Refusals name ``field`` (its revision: the
    ``.revision`` beside it)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    fetch = fetch or snapshot_download
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    for cache in (settings.runpod_hf_cache, settings.hub_cache):
        if cache.is_dir():
            try:
                path = Path(fetch(repo_id, cache_dir=cache, local_files_only=True, token=token, **options))
            except (hub_errors.LocalEntryNotFoundError, FileNotFoundError):
                continue
            if usable(path):
                return path, "cache"
    if settings.hf_hub_offline:
        raise ModelSourceError(field, f"{repo_id} is not cached on this worker and HF_HUB_OFFLINE is set")
    if emit:
        emit(Progress(stage="download", step=0, total=1))
    try:
        path = Path(fetch(repo_id, cache_dir=settings.hub_cache, token=token, **options))
    except hub_errors.GatedRepoError:
        raise ModelSourceError(field, f"{repo_id} is gated: HF_TOKEN must belong to an account with access")
    except hub_errors.RepositoryNotFoundError:
        raise ModelSourceError(field, f"{repo_id} not found on the hub (if private, set HF_TOKEN)")
    except hub_errors.RevisionNotFoundError:
        revision_field = field.rpartition(".")[0] + ".revision"
        raise ModelSourceError(revision_field, f"{options.get('revision')!r} not found in {repo_id}")
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(field, f"could not download {repo_id} ({type(exc).__name__})") from None
    if emit:
        emit(Progress(stage="download", step=1, total=1))
    return path, "hub"

"""Fixtures: tiny random-weight models built once per session, and a CPU engine on them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A MODELS_DIR holding the embedded model, prebuilt so subprocesses start fast."""
    from builder import tiny_model

    root = tmp_path_factory.mktemp("models")
    tiny_model.ensure(root / "embedded" / f"{tiny_model.NAME}-v{tiny_model.VERSION}")
    return root


@pytest.fixture(scope="session")
def tiny_dir(models_dir) -> Path:
    from builder import tiny_model

    return models_dir / "embedded" / f"{tiny_model.NAME}-v{tiny_model.VERSION}"


@pytest.fixture(scope="session")
def inpaint_dir(tmp_path_factory) -> Path:
    from builder import tiny_model

    return tiny_model.ensure(tmp_path_factory.mktemp("inpaint") / "tiny-inpaint", inpaint=True)


@pytest.fixture(scope="session")
def engine(models_dir):
    from worker.engine import Engine
    from worker.settings import Settings

    return Engine(Settings(models_dir=models_dir, allow_private_urls=True, hf_hub_offline=True, max_loaded_models=3))


@pytest.fixture
def run(engine):
    """Run a request dict on the shared engine; returns (result, progress events)."""
    from schemas import InferenceRequest

    def _run(cancelled=lambda: False, **fields):
        events = []
        request = InferenceRequest.model_validate(fields, context={"limits": engine.settings.limits})
        return engine.generate(request, events.append, cancelled), events

    return _run

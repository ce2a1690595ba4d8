"""Fixtures: tiny random-weight models built once per session, and a CPU engine on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import BUCKET, RangeServer
from worker.settings import Settings


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
def sdxl_dir(tmp_path_factory) -> Path:
    from tests.fixtures.sdxl import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory) -> Path:
    from tests.fixtures.sd3 import build_sd3

    return build_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux import build_flux

    return build_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="session")
def kontext_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux import build_flux

    return build_flux(tmp_path_factory.mktemp("kontext") / "tiny-kontext", kontext=True)


@pytest.fixture(scope="session")
def zimage_dir(tmp_path_factory) -> Path:
    from tests.fixtures.zimage import build_zimage

    return build_zimage(tmp_path_factory.mktemp("zimage") / "tiny-zimage")


@pytest.fixture(scope="session")
def klein_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux2 import build_klein

    return build_klein(tmp_path_factory.mktemp("klein") / "tiny-klein-base")


@pytest.fixture(scope="session")
def klein_distilled_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux2 import build_klein

    return build_klein(tmp_path_factory.mktemp("klein-distilled") / "tiny-klein", distilled=True)


@pytest.fixture(scope="session")
def flux2_dev_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux2 import build_dev

    return build_dev(tmp_path_factory.mktemp("flux2-dev") / "tiny-flux2-dev")


@pytest.fixture(scope="session")
def qwenimage_dir(tmp_path_factory) -> Path:
    from tests.fixtures.qwenimage import build_qwenimage

    return build_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny-qwenimage")


@pytest.fixture(scope="session")
def qwenedit_dir(tmp_path_factory) -> Path:
    from tests.fixtures.qwenimage import build_qwenimage

    return build_qwenimage(tmp_path_factory.mktemp("qwenedit") / "tiny-qwen-edit", "edit")


@pytest.fixture(scope="session")
def qwenedit_plus_dir(tmp_path_factory) -> Path:
    from tests.fixtures.qwenimage import build_qwenimage

    return build_qwenimage(tmp_path_factory.mktemp("qwenedit-plus") / "tiny-qwen-edit-plus", "edit-plus")


@pytest.fixture(scope="session")
def fill_dir(tmp_path_factory) -> Path:
    from tests.fixtures.flux import build_flux

    return build_flux(tmp_path_factory.mktemp("fill") / "tiny-fill", fill=True)


@pytest.fixture(scope="session")
def refiner_dir(tmp_path_factory) -> Path:
    from tests.fixtures.sdxl import build_sdxl_refiner

    return build_sdxl_refiner(tmp_path_factory.mktemp("refiner") / "tiny-refiner")


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


@pytest.fixture
def runner(engine):
    """The SDK's side of the worker (JobRunner) on the session's warm engine."""
    from worker.jobs import JobRunner

    return JobRunner(engine.settings, sdk_config={}, engine=engine)


@pytest.fixture
def fresh_runner(settings, models_dir):
    """A JobRunner on a fresh worker, with the test's S3: nothing warm, nothing cached but the
    embedded model."""
    from worker.jobs import JobRunner

    return JobRunner(settings.model_copy(update={"models_dir": models_dir}), sdk_config={})


# --- Storage: a real S3 API over HTTP (moto's server) and a Range-capable HTTP server ---

@pytest.fixture(scope="session")
def s3_endpoint():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A client of the session's S3 server; the bucket is emptied after each test, so what one
    test published (an archive, its .sha256) never meets another's."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


@pytest.fixture
def http():
    server = RangeServer()
    yield server
    server.close()


@pytest.fixture
def settings(tmp_path, s3_endpoint) -> Settings:
    return Settings(
        models_dir=tmp_path / "models", hf_hub_offline=True, runpod_hf_cache=tmp_path / "none",
        aws_s3_endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test-secret-key",
        aws_default_region="us-east-1", aws_s3_default_bucket=BUCKET, allow_private_urls=True,
        download_chunk_mb=1, download_concurrency=4, max_loaded_models=2,
    )

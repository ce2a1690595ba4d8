"""The RunPod Hub listing (.runpod/hub.json, .runpod/tests.json, as RunPod's publishing guide
describes them): both parse with the fields the Hub reads, every variable the listing offers is
one the worker reads (its defaults and options valid values of it), and every case RunPod runs
on a new release passes here on the embedded model, through the streaming handler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import stream
from worker.errors import ModelSourceError

HUB = Path(__file__).resolve().parents[1] / ".runpod"
# Variables boto3 reads itself (the worker passes its clients no endpoint of its own for them).
BOTO3_READS = {"AWS_ENDPOINT_URL"}


def hub() -> dict:
    return json.loads((HUB / "hub.json").read_text())


def cases() -> dict:
    return json.loads((HUB / "tests.json").read_text())


def test_the_listing_has_what_the_hub_reads():
    listing = hub()
    assert listing["type"] == "serverless" and listing["category"] == "image"
    assert listing["title"] and 50 < len(listing["description"]) < 400
    config = listing["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["containerDiskInGb"] >= 40
    assert config["gpuIds"] and config["allowedCudaVersions"]
    for preset in config["presets"]:
        assert preset["name"] and preset["defaults"]["MODEL_ID"]
    for variable in config["env"]:
        assert {"name", "type", "description"} <= set(variable["input"]), variable["key"]
        assert variable["input"]["type"] in ("string", "number", "boolean")


def test_every_variable_it_offers_is_one_the_worker_reads_with_valid_values(monkeypatch):
    from pydantic import ValidationError

    from worker.settings import Settings

    read = {(field.validation_alias if isinstance(field.validation_alias, str) else name).upper()
            for name, field in Settings.model_fields.items()}
    aliases = {choice.upper() for field in Settings.model_fields.values()
               for choice in getattr(field.validation_alias, "choices", [])}
    config = hub()["config"]
    values = [(v["key"], v["input"]["default"]) for v in config["env"] if "default" in v["input"]]
    values += [(v["key"], option["value"]) for v in config["env"] for option in v["input"].get("options", [])]
    values += [(key, value) for preset in config["presets"] for key, value in preset["defaults"].items()]
    for variable in config["env"]:
        assert variable["key"] in read | aliases | BOTO3_READS, f"{variable['key']}: the worker reads no such variable"
    for key, value in values:
        if key in BOTO3_READS:
            continue
        monkeypatch.setenv(key, str(value).lower() if isinstance(value, bool) else str(value))
        try:
            Settings()
        except ValidationError as error:
            raise AssertionError(f"{key}={value}: {error}") from None
        monkeypatch.delenv(key)


@pytest.mark.parametrize("case", cases()["tests"], ids=lambda case: case["name"])
def test_each_release_test_passes_on_the_embedded_model(settings, case):
    """As RunPod runs them on a new release: the endpoint's environment is tests.json's (none:
    the embedded model), each input a job, which must end in a result within its timeout."""
    import time

    from worker.jobs import JobRunner

    assert not cases()["config"]["env"]  # (so the embedded model serves them)
    assert case["timeout"] >= 60_000  # milliseconds: a cold GPU worker loads the model first
    start = time.perf_counter()
    items = stream(JobRunner(settings, sdk_config={}), {"id": case["name"], "input": case["input"]})
    result = items[-1]
    assert result["type"] == "result" and len(result["images"]) == case["input"].get("num_images", 1), result
    assert (time.perf_counter() - start) * 1000 < case["timeout"]


def test_hub_models_are_cached_where_huggingface_hub_would_put_them(settings, tiny_dir, tmp_path, monkeypatch):
    """HF_HUB_CACHE, else HF_HOME/hub, as huggingface_hub reads them; MODELS_DIR/hub only where
    neither is set: a model cached at HF_HOME/hub serves a request for it, offline."""
    from tests.helpers import generate, hub_cache
    from worker.settings import Settings

    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    assert Settings().hub_cache == tmp_path / "models" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert Settings().hub_cache == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert Settings().hub_cache == tmp_path / "hub-cache"
    hub_cache(tmp_path / "hf-home" / "hub", "acme/tiny", tiny_dir, {"main": "a" * 40})
    offline = settings.model_copy(update={"hf_hub_offline": True})
    assert generate(offline.model_copy(update={"hf_home": tmp_path / "hf-home"}), {"id": "acme/tiny"}).model.source \
        == "cache"
    with pytest.raises(ModelSourceError, match=r"^model\.id: "):  # (not in MODELS_DIR/hub)
        generate(offline, {"id": "acme/tiny"})

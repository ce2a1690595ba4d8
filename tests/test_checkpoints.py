"""Tier 2: single-file checkpoints in the original SD layout, converted with a model's configs."""

from __future__ import annotations

import pickle

import pytest

from tests.helpers import BUCKET, generate
from tests.ldm import write_checkpoint
from worker.errors import ModelSourceError


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from builder import tiny_model

    return tiny_model.ensure(tmp_path_factory.mktemp("sd-layout") / "tiny", sd_layout=True)


@pytest.fixture(scope="module")
def files(sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    return {suffix: write_checkpoint(sd_dir, out / f"tiny{suffix}").read_bytes() for suffix in (".safetensors", ".ckpt")}


def test_safetensors_checkpoint_over_https_matches_the_source_model(settings, http, files, sd_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    events: list = []
    first = generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors"}, events)
    assert (first.model.id, first.model.source) == (str(sd_dir), "checkpoint")
    assert [e for e in events if e.stage == "download"][-1].step == len(files[".safetensors"])
    again = generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors"})
    assert again.model.source == "cache"  # converted once, a plain load since
    direct = generate(settings, {"id": str(sd_dir)})
    assert first.images[0].base64 == again.images[0].base64 == direct.images[0].base64
    converted = next((settings.models_dir / "checkpoints").iterdir())
    assert {p.suffix for p in converted.rglob("*.*") if p.is_file()} <= {".json", ".safetensors", ".txt"}


def test_ckpt_checkpoint_from_s3_is_read_as_weights_only(settings, s3, files, sd_dir):
    s3.put_object(Bucket=BUCKET, Key="ckpt/tiny.ckpt", Body=files[".ckpt"])
    result = generate(settings, {"id": str(sd_dir), "checkpoint_url": "s3://models/ckpt/tiny.ckpt"})
    direct = generate(settings, {"id": str(sd_dir)})
    assert result.model.source == "checkpoint"
    assert result.images[0].base64 == direct.images[0].base64


class _Payload:
    """Unpickling this runs a command: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_code_is_refused_and_nothing_runs(settings, http, sd_dir, tmp_path):
    marker = tmp_path / "pwned"
    http.files["/evil.ckpt"] = pickle.dumps({"state_dict": {"x": _Payload(marker)}})
    with pytest.raises(ModelSourceError, match=r"^model\.checkpoint_url: refused to load the \.ckpt: it is not plain weights"):
        generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/evil.ckpt"})
    assert not marker.exists()
    assert not (settings.models_dir / "checkpoints").exists()


def test_checkpoint_that_does_not_fit_the_configs_names_the_field(settings, http, files, tiny_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    with pytest.raises(ModelSourceError, match=r"^model\.checkpoint_url: could not convert the checkpoint"):
        generate(settings, {"id": str(tiny_dir), "checkpoint_url": http.url + "/tiny.safetensors"})


def test_a_hub_model_gives_its_configs_without_its_weights(settings, http, files, sd_dir, tmp_path):
    """A checkpoint replaces the weights: from the hub, only the configs are needed."""
    import shutil

    from tests.helpers import hub_cache

    configs = tmp_path / "configs-only"
    shutil.copytree(sd_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    hub = hub_cache(tmp_path / "hub", "acme/sd-base", configs, {"main": "9" * 40})
    http.files["/tiny.safetensors"] = files[".safetensors"]
    result = generate(settings.model_copy(update={"hf_hub_cache": hub}),
                      {"id": "acme/sd-base", "checkpoint_url": http.url + "/tiny.safetensors"})
    assert (result.model.id, result.model.source) == ("acme/sd-base", "checkpoint")
    assert result.images[0].base64 == generate(settings, {"id": str(sd_dir)}).images[0].base64


def test_checkpoint_url_from_the_environment(settings, http, files, sd_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    operator = settings.model_copy(update={
        "model_id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors", "allow_private_urls": False,
    })
    assert generate(operator, {}).model.source == "checkpoint"

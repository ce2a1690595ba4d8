"""Tier 2: where weights come from (embedded, local, hub caches) and the warm-model store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from schemas import InferenceRequest, ModelSpec
from tests.helpers import hub_cache
from worker.engine import Engine
from worker.errors import ModelSourceError
from worker.settings import Settings
from worker.sources.refs import EMBEDDED_ID, ModelRef, model_ref


def make_engine(tmp_path: Path, **settings) -> Engine:
    defaults = dict(
        models_dir=tmp_path / "models", hf_hub_offline=True, runpod_hf_cache=tmp_path / "no-volume", preload_model=False
    )
    return Engine(Settings(**(defaults | settings)))


def generate(engine: Engine, **fields):
    request = InferenceRequest.model_validate({"prompt": "p", "num_inference_steps": 2, "seed": 1} | fields)
    events = []
    return engine.generate(request, events.append, lambda: False), events


def test_request_fields_fill_from_the_environment():
    settings = Settings(model_id="acme/base", model_revision="v2", model_variant="fp16", model_precision="bf16")
    assert model_ref(ModelSpec(), settings, "cuda") == ModelRef("acme/base", "v2", "fp16", "bf16")
    # Revision and variant describe MODEL_ID, so they do not carry over to another model.
    assert model_ref(ModelSpec(id="acme/other"), settings, "cuda") == ModelRef("acme/other", None, None, "bf16")
    assert model_ref(ModelSpec(), Settings(), "cpu") == ModelRef(EMBEDDED_ID, None, None, "fp32")
    assert model_ref(ModelSpec(), Settings(), "cuda").precision == "fp16"


def test_a_checkpoint_takes_its_configs_from_model_id_or_else_from_its_layout():
    checkpoint = "s3://bucket/dir/model.safetensors"
    operator = Settings(model_id="acme/base", model_revision="v2")
    assert model_ref(ModelSpec(id="acme/xl", checkpoint_url=checkpoint), operator, "cpu").id == "acme/xl"
    # A request's checkpoint is not described by the operator's MODEL_ID: its own keys tell.
    assert model_ref(ModelSpec(checkpoint_url=checkpoint), operator, "cpu") == ModelRef(
        "url:model.safetensors", None, None, "fp32", checkpoint_url=checkpoint)
    # The operator's CHECKPOINT_URL goes with MODEL_ID (and its revision) when both are set.
    both = Settings(model_id="acme/base", model_revision="v2", checkpoint_url=checkpoint)
    assert model_ref(ModelSpec(), both, "cpu") == ModelRef("acme/base", "v2", None, "fp32", checkpoint_url=checkpoint)
    assert model_ref(ModelSpec(), Settings(checkpoint_url=checkpoint), "cpu").id == "url:model.safetensors"


def test_embedded_model_is_built_on_first_use(tmp_path):
    engine = make_engine(tmp_path)
    result, events = generate(engine)
    assert (result.model.id, result.model.source) == (EMBEDDED_ID, "embedded")
    assert [(e.stage, e.step) for e in events if e.stage == "load"] == [("load", 0), ("load", 1)]
    assert "load" in result.timings
    again, events = generate(engine)
    assert again.model.source == "memory" and not [e for e in events if e.stage == "load"]


def test_hub_id_found_in_our_cache(tmp_path, tiny_dir):
    hub_cache(tmp_path / "models" / "hub", "acme/tiny", tiny_dir, {"main": "a" * 40})
    result, _ = generate(make_engine(tmp_path), model={"id": "acme/tiny"})
    assert (result.model.id, result.model.source) == ("acme/tiny", "cache")


def test_runpod_model_cache_is_used(tmp_path, tiny_dir):
    volume_cache = hub_cache(tmp_path / "runpod-volume" / "huggingface-cache" / "hub", "acme/tiny", tiny_dir,
                             {"main": "b" * 40})
    engine = make_engine(tmp_path, runpod_hf_cache=volume_cache, model_id="acme/tiny")
    result, _ = generate(engine)
    assert (result.model.id, result.model.source) == ("acme/tiny", "cache")
    assert not (tmp_path / "models" / "hub").exists()  # nothing copied or downloaded


def test_revision_selects_the_snapshot(tmp_path, tiny_dir, inpaint_dir):
    cache = tmp_path / "models" / "hub"
    hub_cache(cache, "acme/tiny", tiny_dir, {"main": "c" * 40})
    hub_cache(cache, "acme/tiny", inpaint_dir, {"inpaint-v1": "d" * 40})
    engine = make_engine(tmp_path, max_loaded_models=2)
    with pytest.raises(Exception, match="inpainting model"):
        generate(engine, model={"id": "acme/tiny", "revision": "inpaint-v1"})
    result, _ = generate(engine, model={"id": "acme/tiny"})
    assert result.model.source == "cache"


def test_model_not_cached_and_hub_offline_names_the_field(tmp_path):
    with pytest.raises(ModelSourceError, match=r"^model\.id: acme/missing is not cached on this worker"):
        generate(make_engine(tmp_path), model={"id": "acme/missing"})


def test_local_directory_errors_name_the_field(tmp_path):
    engine = make_engine(tmp_path)
    with pytest.raises(ModelSourceError, match=r"^model\.id: no diffusers model at /nonexistent"):
        generate(engine, model={"id": "/nonexistent"})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match=r"^model\.id: could not load"):
        generate(engine, model={"id": str(broken)})
    result, _ = generate(engine)  # and the engine still serves
    assert result.images


def test_least_recently_used_model_is_dropped(tmp_path, tiny_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    engine = make_engine(tmp_path, max_loaded_models=1)
    a, _ = generate(engine, model={"id": str(tiny_dir)})
    b, _ = generate(engine, model={"id": str(other)})
    a_again, _ = generate(engine, model={"id": str(tiny_dir)})
    assert [r.model.source for r in (a, b, a_again)] == ["local", "local", "local"]
    assert a.images[0].base64 == b.images[0].base64 == a_again.images[0].base64
    assert len(engine.models.loaded()) == 1

    engine = make_engine(tmp_path, max_loaded_models=2)
    sources = [generate(engine, model={"id": str(path)})[0].model.source for path in (tiny_dir, other, tiny_dir)]
    assert sources == ["local", "local", "memory"]


def test_a_request_for_a_missing_model_does_not_evict_the_warm_one(tmp_path, tiny_dir):
    engine = make_engine(tmp_path, max_loaded_models=1)
    generate(engine, model={"id": str(tiny_dir)})
    with pytest.raises(ModelSourceError):
        generate(engine, model={"id": "/no/such/model"})
    assert generate(engine, model={"id": str(tiny_dir)})[0].model.source == "memory"


def test_byte_budget_keeps_what_fits(tmp_path, tiny_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    roomy = make_engine(tmp_path, max_loaded_models=3, max_loaded_gb=1.0)
    tight = make_engine(tmp_path, max_loaded_models=3, max_loaded_gb=0.010)  # one 8 MB model
    for engine, expected in ((roomy, "memory"), (tight, "local")):
        sources = [generate(engine, model={"id": str(p)})[0].model.source for p in (tiny_dir, other, tiny_dir)]
        assert sources == ["local", "local", expected]


@pytest.mark.gpu
def test_switching_back_on_cuda_comes_from_cpu_ram(tmp_path, tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    engine = make_engine(tmp_path, max_loaded_models=1, max_parked_models=1)
    a, _ = generate(engine, model={"id": str(tiny_dir)})
    generate(engine, model={"id": str(other)})
    [parked] = engine.models.parked()
    assert parked.pipeline.unet.device.type == "cpu"
    a_again, _ = generate(engine, model={"id": str(tiny_dir)})
    assert a_again.model.source == "memory" and a_again.images[0].base64 == a.images[0].base64


def test_precision_is_applied(tmp_path, tiny_dir):
    engine = make_engine(tmp_path)
    result, _ = generate(engine, model={"id": str(tiny_dir), "precision": "bf16"})
    assert result.model.precision == "bf16"
    loaded = engine.models.loaded()[0]
    assert str(loaded.pipeline.unet.dtype) == "torch.bfloat16"


@pytest.mark.gpu
def test_cuda_runs_fp16_by_default(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    result, _ = generate(make_engine(tmp_path))
    assert (result.model.device, result.model.precision) == ("cuda", "fp16")

"""Memory: OFFLOAD (diffusers' model CPU offload, or leaf-level group offloading for
``sequential``) gives the images of a model kept whole on the device, LoRAs and ControlNets
included; on CUDA a model runs in its family's own precision unless one is chosen (FLUX.1:
bf16). Offloading moves weights to the device as they run: here the device is the CPU, so the
hooks run and move nothing, and the images must stay bit for bit the same."""

from __future__ import annotations

import pytest

from tests.helpers import png_b64
from worker.engine import Engine


@pytest.fixture(scope="module")
def flux_parts(flux_dir, tmp_path_factory):
    from tests.fixtures.flux import build_flux_controlnet, make_flux_lora

    root = tmp_path_factory.mktemp("offload-parts")
    return {"lora": str(make_flux_lora(flux_dir, root / "lora.safetensors")),
            "net": str(build_flux_controlnet(flux_dir, root / "net"))}


def draw(engine: Engine, flux_dir, **fields) -> str:
    from schemas import InferenceRequest

    request = InferenceRequest.model_validate({"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 2,
                                               "width": 64, "height": 64, "model": {"id": str(flux_dir)}} | fields)
    return engine.generate(request, lambda event: None, lambda: False).images[0].base64


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_an_offloaded_model_draws_what_the_whole_model_draws(engine, flux_dir, flux_parts, mode):
    offloaded = Engine(engine.settings.model_copy(update={"offload": mode}))
    jobs = [{}, {"loras": [{"id": flux_parts["lora"], "scale": 0.8}]},
            {"controlnets": [{"id": flux_parts["net"], "image": png_b64()}]}, {}]
    expected = [draw(engine, flux_dir, **job) for job in jobs]
    assert [draw(offloaded, flux_dir, **job) for job in jobs] == expected  # the LoRA gone again after
    assert len(set(expected)) == 3
    [loaded] = offloaded.models.loaded()
    transformer = loaded.pipeline.transformer
    hooked = hasattr(transformer, "_hf_hook") if mode == "model" else hasattr(transformer, "_diffusers_hook")
    assert hooked, "no offload hooks on the transformer"


def test_on_cuda_a_model_runs_in_its_familys_precision_unless_one_is_chosen():
    from schemas import ModelSpec
    from worker.families import FLUX, SD3, SDXL
    from worker.settings import Settings
    from worker.sources.refs import load_precision, model_ref

    settings = Settings()
    default = model_ref(ModelSpec(id="org/flux"), settings, "cuda")
    assert (load_precision(default, FLUX), load_precision(default, SDXL), load_precision(default, SD3)) == (
        "bf16", "fp16", "fp16")
    chosen = model_ref(ModelSpec(id="org/flux", precision="fp16"), settings, "cuda")
    assert load_precision(chosen, FLUX) == "fp16" and chosen != default  # (two different loads)
    assert load_precision(model_ref(ModelSpec(id="org/flux"), Settings(model_precision="fp16"), "cuda"),
                          FLUX) == "fp16"
    assert load_precision(model_ref(ModelSpec(id="org/flux"), settings, "cpu"), FLUX) == "fp32"


def test_the_answer_names_the_precision_the_model_runs_in_and_jobs_keep_it(run, engine, flux_dir):
    """(diffusers' from_pipe casts every shared module to fp32 unless told: the warm bf16 model
    would be upcast in place by its first job, to twice the memory.)"""
    import torch

    for task in ({}, {"image": png_b64()}, {"image": png_b64(), "mask_image": png_b64()}):
        result, _ = run(prompt="p", num_inference_steps=2, width=64, height=64, **task,
                        model={"id": str(flux_dir), "precision": "bf16"})
        assert result.model.precision == "bf16"
        [pipe] = [loaded.pipeline for loaded in engine.models.loaded() if loaded.precision == "bf16"]
        assert {module.dtype for module in (pipe.transformer, pipe.text_encoder_2, pipe.vae)} == {torch.bfloat16}

"""Stable Diffusion XL through the worker, on a tiny random-weight SDXL model: every task, its
schedulers, LoRAs, and an archive round trip; training refuses it with a reason."""

from __future__ import annotations

import pytest

from tests.helpers import BUCKET, decode, png_b64
from tests.sdxl import build_sdxl

BASE = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 9}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def xl(run, sdxl_dir, **fields):
    result, events = run(**(BASE | {"model": {"id": str(sdxl_dir)}} | fields))
    return result


@pytest.mark.parametrize("task, fields", [
    ("txt2img", {}),
    ("img2img", {"image": png_b64(size=(64, 64))}),
    ("inpaint", {"image": png_b64(size=(64, 64)), "mask_image": png_b64((255, 255, 255), mode="RGB")}),
])
def test_every_task_runs_on_sdxl(run, sdxl_dir, task, fields):
    result = xl(run, sdxl_dir, **fields)
    assert result.task == task and decode(result.images[0].base64).size == (64, 64)


def test_sdxl_reproduces_and_takes_the_scheduler_table(run, sdxl_dir):
    first = xl(run, sdxl_dir)
    assert xl(run, sdxl_dir).images[0].base64 == first.images[0].base64
    other = xl(run, sdxl_dir, scheduler="DPMSolverMultistep")
    assert other.images[0].base64 != first.images[0].base64


def test_a_lora_on_sdxl(run, sdxl_dir, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    generator = torch.Generator().manual_seed(0)
    layers = {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, weight_name="xl.safetensors")
    plain = xl(run, sdxl_dir)
    styled = xl(run, sdxl_dir, loras=[{"id": str(tmp_path / "xl.safetensors")}])
    assert styled.images[0].base64 != plain.images[0].base64
    assert xl(run, sdxl_dir).images[0].base64 == plain.images[0].base64


def test_sdxl_converts_to_an_archive_and_serves_from_it(settings, s3, sdxl_dir):
    from schemas import ConvertRequest
    from tests.helpers import generate
    from worker.engine import Engine

    request = ConvertRequest.model_validate({"task": "convert", "model": {"id": str(sdxl_dir)},
                                             "convert": {"dest_url": f"s3://{BUCKET}/xl/tiny.tar.zst", "precision": "fp32"}})
    Engine(settings).convert(request, lambda event: None, lambda: False)
    direct = generate(settings, {"id": str(sdxl_dir)})
    served = generate(settings.model_copy(update={"models_dir": settings.models_dir / "fresh"}),
                      {"url": f"s3://{BUCKET}/xl/tiny.tar.zst"})
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


def test_training_sdxl_is_refused_with_a_reason(settings, s3, sdxl_dir):
    from schemas import TrainRequest
    from worker.engine import Engine

    request = TrainRequest.model_validate({"task": "train", "model": {"id": str(sdxl_dir)}, "train": {
        "instance_prompt": "sks", "instance_images": [png_b64()], "dest_url": f"s3://{BUCKET}/x/"}})
    with pytest.raises(Exception, match=r"^model\.id: training supports Stable Diffusion 1\.x / 2\.x models, "
                                        r"not StableDiffusionXLPipeline"):
        Engine(settings).train(request, lambda event: None, lambda: False, "job")

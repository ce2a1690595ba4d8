"""Stable Diffusion XL through the worker, on a tiny random-weight SDXL model: every task, its
schedulers, LoRAs, an archive round trip, and LoRA / DreamBooth training."""

from __future__ import annotations

import pytest

from tests.helpers import decode, png_b64

BASE = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 9}


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
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, sdxl_dir, "xl/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_sdxl_trains_and_the_result_is_usable(settings, s3, sdxl_dir, method):
    from tests.helpers import train_then_use

    result, keys, plain, tuned = train_then_use(settings, s3, sdxl_dir, method, f"xl/trained-{method}",
                                                train_text_encoder=True)
    if method == "lora":
        assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert tuned.images[0].base64 != plain.images[0].base64


def test_clip_skip_on_sdxl(run, sdxl_dir):
    assert xl(run, sdxl_dir, clip_skip=1).images[0].base64 != xl(run, sdxl_dir).images[0].base64

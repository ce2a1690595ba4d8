"""CFG rescale (the request's ``guidance_rescale``): diffusers' rescaled classifier-free
guidance, in every pass of a job, or refused naming the pipeline that has none."""

from __future__ import annotations

import re

import pytest

from tests.helpers import assert_images_close, decode, png_b64
from worker.errors import UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 8, "guidance_scale": 9}


def test_rescaled_guidance_draws_what_diffusers_draws(run, tiny_dir):
    import torch
    from diffusers import DiffusionPipeline

    plain = run(**BASE)[0].images[0]
    for fmt in ("png", "jpeg", "webp"):  # (the φ survives every format: UTF-16 in EXIF's UserComment)
        result, _ = run(**BASE, guidance_rescale=0.7, output={"metadata": True, "format": fmt})
        image = decode(result.images[0].base64)
        if fmt == "png":
            text = image.text["parameters"]
        else:
            comment = image.getexif().get_ifd(0x8769)[0x9286]
            assert comment.startswith(b"UNICODE\0")  # as AUTOMATIC1111 (piexif) writes and reads it
            text = comment[8:].decode("utf-16-be")
        assert "CFG scale: 9.0, CFG Rescale φ: 0.7, Seed: 8" in text
    rescaled = run(**BASE, guidance_rescale=0.7)[0].images[0]
    assert rescaled.base64 != plain.base64

    pipe = DiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=BASE["prompt"], num_inference_steps=3, guidance_scale=9, guidance_rescale=0.7,
                    generator=[torch.Generator("cpu").manual_seed(8)]).images[0]
    assert_images_close(expected, decode(rescaled.base64).convert("RGB"), "guidance-rescale")


def test_sdxl_rescales_in_img2img_and_the_refiner_too(run, sdxl_dir, tmp_path):
    from tests.fixtures.sdxl import build_sdxl_refiner

    xl = BASE | {"model": {"id": str(sdxl_dir)}}
    for job in ({"image": png_b64()}, {"refiner": {"id": str(build_sdxl_refiner(tmp_path / "refiner"))}}):
        assert run(**xl, **job, guidance_rescale=0.5)[0].images[0].base64 != run(**xl, **job)[0].images[0].base64


@pytest.mark.parametrize("model, job, pipeline", [
    (None, {"image": png_b64()}, "StableDiffusionImg2ImgPipeline"),
    (None, {"hires": {"scale": 1.5}}, "StableDiffusionImg2ImgPipeline (the hires pass)"),
    ("sd3_dir", {}, "StableDiffusion3Pipeline"),
])
def test_pipelines_without_it_refuse_it_by_name(run, request, model, job, pipeline):
    fields = BASE | ({"model": {"id": str(request.getfixturevalue(model))}} if model else {})
    with pytest.raises(UserInputError, match=rf"^guidance_rescale: diffusers' {re.escape(pipeline)} has none"):
        run(**fields, **job, guidance_rescale=0.7)



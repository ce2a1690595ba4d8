"""AUTOMATIC1111's hires fix (``hires``): a txt2img pass, upscaled, then denoised again larger."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas import InferenceRequest, Limits, describe_validation_error
from tests.fixtures.controlnets import build_controlnet
from tests.helpers import decode, png_b64
from worker.errors import UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 4, "seed": 12, "scheduler": "EulerDiscrete"}


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_runs_a_second_larger_pass(run, upscaler):
    result, events = run(**BASE, hires={"upscaler": upscaler})
    image = result.images[0]
    assert (image.width, image.height) == (128, 128) == decode(image.base64).size  # the model's 64 px, twice
    assert run(**BASE, hires={"upscaler": upscaler})[0].images[0].base64 == image.base64
    assert image.base64 != run(**BASE, width=128, height=128)[0].images[0].base64  # not a plain 128 px image
    hires = [e for e in events if e.stage == "hires"]
    assert [e.step for e in hires] == [1, 2] and hires[-1].total == 2  # 4 steps at strength 0.7: 2 run
    assert [e.step for e in events if e.stage == "inference"] == [1, 2, 3, 4]
    assert result.timings["hires"] > 0


def test_hires_settings_change_the_image(run):
    default = run(**BASE, hires={})[0].images[0].base64
    for hires in ({"strength": 0.3}, {"steps": 8}, {"upscaler": "lanczos"}):
        assert run(**BASE, hires=hires)[0].images[0].base64 != default
    image = run(**BASE, width=64, height=72, hires={"scale": 1.5})[0].images[0]
    assert (image.width, image.height) == (96, 104)  # 108 rounded down to a multiple of 8


def test_hires_with_several_images_a_controlnet_and_sdxl(run, tiny_dir, sdxl_dir, tmp_path):
    net = build_controlnet(tiny_dir, tmp_path / "net")
    result, _ = run(**BASE, num_images=2, hires={"scale": 1.5},
                    controlnets=[{"id": str(net), "image": png_b64(size=(64, 80))}])
    assert [(i.width, i.height) for i in result.images] == [(96, 120)] * 2
    assert result.images[0].base64 != result.images[1].base64
    xl = run(**BASE, model={"id": str(sdxl_dir)}, hires={"scale": 1.5})[0].images[0]
    assert (xl.width, xl.height) == (96, 96)


def test_hires_is_written_into_the_image_as_a1111_does(run):
    result, _ = run(**BASE, hires={"scale": 1.5, "strength": 0.5}, output={"metadata": True})
    text = decode(result.images[0].base64).info["parameters"]
    assert "Size: 64x64" in text  # the first pass's, as AUTOMATIC1111 writes it
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent" in text


def test_the_second_pass_can_have_prompts_of_its_own(run):
    """AUTOMATIC1111's hires prompt: the second pass reads it instead of the prompt."""
    plain = run(**BASE, hires={})[0].images[0].base64
    assert run(**BASE, hires={"prompt": BASE["prompt"]})[0].images[0].base64 == plain  # the same words: the same
    own = run(**BASE, hires={"prompt": "a lighthouse, intricate detail"}, output={"metadata": True})[0].images[0]
    assert own.base64 != plain
    assert 'Hires prompt: "a lighthouse, intricate detail"' in decode(own.base64).text["parameters"]
    # Weighted words in one pass and plain text in the other (embeddings here, text there), and
    # a negative prompt for the second pass alone.
    for hires in ({"prompt": "(a lighthouse:1.4) BREAK sea"}, {"negative_prompt": "blurry"}):
        assert run(**BASE, hires=hires)[0].images[0].base64 not in (plain, own.base64)
    with pytest.raises(ValidationError, match="hires.prompt: <lora:detail:0.5> is AUTOMATIC1111's tag"):
        run(**BASE, hires={"prompt": "a lighthouse <lora:detail:0.5>"})


def test_hires_over_the_pixel_cap_names_the_field(engine):
    from worker.engine import Engine

    small = Engine(engine.settings.model_copy(update={"max_pixels": 100 * 100}))
    request = InferenceRequest.model_validate(BASE | {"hires": {"scale": 2}})
    with pytest.raises(UserInputError, match=r"^hires\.scale: 64x64 times 2\.0 is over this endpoint's 10000 pixels"):
        small.generate(request, lambda _: None, lambda: False)


@pytest.mark.parametrize("fields, expected", [
    ({"image": png_b64(), "hires": {}}, "hires: only with task 'txt2img', not 'img2img'"),
    ({"hires": {"strength": 0.1}}, "hires.strength: 0.1 of 4 steps runs no step"),
    ({"hires": {"scale": 1}}, "hires.scale: input should be greater than 1"),
    ({"hires": {"upscaler": "esrgan"}}, "hires.upscaler: "),
    ({"width": 512, "height": 512, "hires": {"scale": 2}}, "hires.scale: 512x512 times 2.0 is over this endpoint's"),
    ({"hires": {"steps": 500}}, "hires.steps: at most 150 on this endpoint, got 500"),
])
def test_bad_hires_fields_name_themselves(fields, expected):
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(BASE | fields, context={"limits": Limits(max_pixels=512 * 512)})
    assert describe_validation_error(info.value).startswith(expected)

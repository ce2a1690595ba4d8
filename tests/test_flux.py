"""FLUX.1 (worker/families/flux.py) on a tiny random pipeline: what a request leaves out takes
diffusers' defaults for the model ([dev]: 28 steps, guidance 3.5; [schnell]: 4 steps, T5 reading
256 tokens); ``true_cfg_scale``; seeds in batches; img2img and inpainting; Kontext's edit; Fill;
Forge's payloads; LoRAs for one request (three layouts); step caching; what it refuses, by field.
ControlNets and training have their own modules (test_flux_controlnets, test_flux_training)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_images_close, decode, image_b64, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


def diffusers_image(model_dir, cls: str = "FluxPipeline", seed: int = 1, **fields):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**fields, generator=torch.Generator("cpu").manual_seed(seed)).images[0]



def ours(result, i: int = 0):
    return decode(result.images[i].base64)


def test_txt2img_at_flux_defaults_is_diffusers_fluxpipeline_at_its_own(run, flux_dir):
    """No steps, no guidance: FluxPipeline's own 28 steps and guidance 3.5, not SD's 25 and 7.5."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(flux_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 28
    expected = diffusers_image(flux_dir, prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "flux-defaults", tolerance=0)


def test_schnell_takes_its_own_steps_and_sequence_length(run, tmp_path):
    from tests.fixtures.flux import build_flux

    schnell = build_flux(tmp_path / "schnell", schnell=True)
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(schnell)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 4
    expected = diffusers_image(schnell, prompt="a lighthouse", num_inference_steps=4, max_sequence_length=256, **SIZE)
    assert_images_close(expected, ours(result), "flux-schnell", tolerance=0)
    # What the request says wins.
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(schnell)}, num_inference_steps=2, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 2


def test_true_cfg_with_a_negative_prompt_is_diffusers_own(run, flux_dir):
    fields = dict(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=3, guidance_scale=2.0, **SIZE)
    result, _ = run(seed=2, model={"id": str(flux_dir)}, true_cfg_scale=4.0, **fields)
    expected = diffusers_image(flux_dir, seed=2, true_cfg_scale=4.0, **fields)
    assert_images_close(expected, ours(result), "flux-true-cfg", tolerance=0)
    plain, _ = run(seed=2, model={"id": str(flux_dir)}, **fields)
    assert plain.images[0].base64 != result.images[0].base64  # (1: off; diffusers' default)


def test_true_cfg_scale_is_refused_where_guidance_is_real_cfg(run):
    with pytest.raises(UserInputError, match=r"^true_cfg_scale: the embedded model is an SD 1\.x/2\.x model: its "):
        run(prompt="p", true_cfg_scale=3.0, num_inference_steps=1)


def test_each_image_of_a_batch_is_reproduced_alone_by_its_seed(run, flux_dir):
    fields = dict(prompt="a lighthouse", num_inference_steps=2, model={"id": str(flux_dir)}, **SIZE)
    batch, _ = run(seed=10, num_images=3, **fields)
    alone, _ = run(seed=12, **fields)
    assert batch.images[2].seed == 12
    assert_images_close(ours(alone), ours(batch, 2), "flux-batch-seed")


def test_img2img_is_diffusers_fluximg2img_at_the_inputs_size(run, flux_dir):
    image = stripes((96, 64))
    result, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=4, strength=0.6, image=image_b64(image),
                    model={"id": str(flux_dir)})
    expected = diffusers_image(flux_dir, "FluxImg2ImgPipeline", seed=3, prompt="a lighthouse", num_inference_steps=4,
                               strength=0.6, image=image, width=96, height=64)
    assert_images_close(expected, ours(result), "flux-img2img", tolerance=0)
    # An input off FLUX.1's multiple of 16 gives an answer at its size rounded down.
    result, _ = run(prompt="a lighthouse", num_inference_steps=2, image=image_b64(stripes((100, 72))),
                    model={"id": str(flux_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)


def test_inpainting_repaints_the_mask_and_keeps_the_rest(run, flux_dir):
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted

    result, _ = run(prompt="a lighthouse", seed=4, num_inference_steps=3, image=image_b64(image),
                    mask_image=image_b64(mask), mask_blur=0, model={"id": str(flux_dir)})
    pixels = np.asarray(ours(result).convert("RGB")).astype(int)
    assert (pixels[:, 40:] == (200, 30, 30)).all()  # kept exactly
    assert np.abs(pixels[:, :24] - (200, 30, 30)).max() > 20  # repainted


def diffusers_lora_image(model_dir, lora, scale: float, seed: int):
    """What diffusers draws (3 steps, 64 px) with ``lora`` loaded at ``scale``."""
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[scale])
    return pipe(prompt="a lighthouse", num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                **SIZE).images[0]


def test_a_lora_for_one_request_is_diffusers_own_and_gone_after(run, flux_dir, tmp_path):
    from tests.fixtures.flux import make_flux_lora

    lora = make_flux_lora(flux_dir, tmp_path / "flux-lora.safetensors")
    fields = dict(prompt="a lighthouse", num_inference_steps=3, seed=5, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    styled, _ = run(**fields, loras=[{"id": str(lora), "scale": 0.8}])
    expected = diffusers_lora_image(flux_dir, lora, 0.8, seed=5)
    assert_images_close(expected, ours(styled), "flux-lora", tolerance=1)
    again, _ = run(**fields)
    assert again.images[0].base64 == plain.images[0].base64  # the next request gets the plain model


def test_kontext_edits_at_the_inputs_size_as_diffusers_does_at_that_size(run, kontext_dir):
    """``task: "edit"``: the prompt is the instruction, ``image`` the picture; the answer has the
    input's size rounded down to 16 (or the requested one), never Kontext's own megapixel."""
    image = stripes((96, 64))
    result, _ = run(task="edit", prompt="make it snow", image=image_b64(image), seed=6, num_inference_steps=3,
                    model={"id": str(kontext_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    expected = diffusers_image(kontext_dir, "FluxKontextPipeline", seed=6, image=image, prompt="make it snow",
                               num_inference_steps=3, width=96, height=64, max_area=96 * 64, _auto_resize=False)
    assert_images_close(expected, ours(result), "kontext-edit", tolerance=0)
    asked, _ = run(task="edit", prompt="make it snow", image=image_b64(stripes((100, 72))), width=64, height=80,
                   num_inference_steps=2, model={"id": str(kontext_dir)})
    assert (asked.images[0].width, asked.images[0].height) == (64, 80)


def test_edit_is_for_models_made_for_it(run, kontext_dir, flux_dir):
    with pytest.raises(UserInputError, match=r"^task: .* is a FLUX\.1 model; it runs txt2img, img2img, inpaint, "
                                             r"not edit"):
        run(task="edit", prompt="make it snow", image=image_b64(stripes((64, 64))), num_inference_steps=2,
            model={"id": str(flux_dir)})
    with pytest.raises(UserInputError, match=r"^task: .* is a FLUX\.1 Kontext model; it runs txt2img, edit, "
                                             r"not img2img"):
        run(prompt="p", image=image_b64(stripes((64, 64))), num_inference_steps=2, model={"id": str(kontext_dir)})


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "a (lighthouse:1.3)"}, "prompt: weights like (word:1.2), [word] and BREAK are read for SD 1.x, 2.x "
                                       "and XL models, not FLUX.1 ones"),
    ({"scheduler": "DDIM"}, "scheduler: DDIM cannot sample this model, a flow-matching model (FLUX.1)"),
    ({"clip_skip": 1}, "clip_skip: {model} is a FLUX.1 model; its prompts are read by T5 as well as CLIP"),
    ({"refiner": {"id": "/refiner"}}, "refiner: {model} is not an SDXL model"),
    ({"width": 72}, "width: must be a multiple of 16 for {model}, got 72"),
])
def test_what_flux_does_not_take_is_refused_by_field(run, flux_dir, fields, message):
    with pytest.raises(UserInputError) as info:
        run(**{"prompt": "p", "num_inference_steps": 1, "model": {"id": str(flux_dir)}, **SIZE, **fields})
    assert str(info.value).startswith(message.format(model=flux_dir)), str(info.value)


def test_a_kontext_edit_through_the_streaming_handler(runner, kontext_dir):
    from tests.helpers import stream

    *progress, result = stream(runner, {"id": "edit-1", "input": {
        "task": "edit", "prompt": "make it snow", "image": image_b64(stripes((80, 64))), "num_inference_steps": 2,
        "stream": True, "model": {"id": str(kontext_dir)}}})
    assert result.get("type") == "result" and result["task"] == "edit", result
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (80, 64)
    assert [p["step"] for p in progress if p["stage"] == "inference"] == [1, 2]


def test_fill_inpaints_as_diffusers_fluxfillpipeline_at_its_defaults(run, fill_dir):
    """A FLUX.1 Fill model inpaints through FluxFillPipeline at its own defaults (50 steps,
    guidance 30, strength 1) when the request leaves them out."""
    from PIL import Image

    image = stripes((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result, events = run(prompt="a window", seed=7, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0,
                         keep_unmasked=False, model={"id": str(fill_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    expected = diffusers_image(fill_dir, "FluxFillPipeline", seed=7, prompt="a window", image=image,
                               mask_image=mask, width=64, height=64)
    assert_images_close(expected, ours(result), "flux-fill", tolerance=0)


def test_fill_outpaints_keeping_the_image_and_painting_the_margins(run, fill_dir):
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    result, _ = run(prompt="a wall", seed=8, image=image_b64(image), outpaint={"right": 32}, num_inference_steps=3,
                    mask_blur=0, model={"id": str(fill_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    pixels = np.asarray(ours(result).convert("RGB")).astype(int)
    assert (pixels[:, :56] == (200, 30, 30)).all()  # the image, kept
    assert np.abs(pixels[:, 72:] - (200, 30, 30)).max() > 20  # the margin, painted


@pytest.mark.parametrize("fields, message", [
    ({}, "task: {model} is a FLUX.1 Fill model; it runs inpaint, not txt2img"),
    ({"image": True}, "task: {model} is a FLUX.1 Fill model; it runs inpaint, not img2img"),
    ({"image": True, "mask_image": True, "negative_prompt": "fog"},
     "negative_prompt: {model} is a FLUX.1 Fill model; FluxFillPipeline takes no negative prompt"),
    ({"image": True, "mask_image": True, "true_cfg_scale": 3.0},
     "true_cfg_scale: {model} is a FLUX.1 Fill model; FluxFillPipeline has no true classifier-free guidance"),
])
def test_what_fill_does_not_take_is_refused_by_field(run, fill_dir, fields, message):
    pictures = {name: image_b64(stripes((64, 64))) for name in ("image", "mask_image") if fields.pop(name, None)}
    with pytest.raises(UserInputError) as info:
        run(prompt="p", num_inference_steps=2, model={"id": str(fill_dir)}, **pictures, **fields)
    assert str(info.value).startswith(message.format(model=fill_dir)), str(info.value)


def test_forge_payloads_distilled_cfg_scale_is_flux_guidance(runner, flux_dir):
    """A Forge (AUTOMATIC1111) payload for FLUX.1: ``distilled_cfg_scale`` is the embedded
    guidance and ``cfg_scale`` beside it real CFG, in the request and in the infotext."""
    import json

    from schemas import Limits, parse_request
    from tests.helpers import stream

    forge = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 2, "cfg_scale": 3, "distilled_cfg_scale": 2.5,
             "seed": 4, "width": 64, "height": 64, "sampler_name": "Euler", "scheduler": "Simple",
             "override_settings": {"sd_model_checkpoint": str(flux_dir)}}
    request = parse_request(forge, Limits())
    assert (request.guidance_scale, request.true_cfg_scale) == (2.5, 3)
    assert parse_request(forge | {"cfg_scale": 1}, Limits()).true_cfg_scale is None  # 1: off, as Forge's default
    got = stream(runner, {"id": "forge", "input": forge})[-1]
    assert "images" in got, got
    infotext = json.loads(got["info"])["infotexts"][0]
    assert "Sampler: Euler, CFG scale: 3.0, Distilled CFG Scale: 2.5, Seed: 4" in infotext, infotext
    ours = stream(runner, {"id": "ours", "input": {
        "prompt": "a lighthouse", "negative_prompt": "fog", "num_inference_steps": 2, "guidance_scale": 2.5,
        "true_cfg_scale": 3, "seed": 4, "width": 64, "height": 64, "scheduler": "FlowMatchEulerDiscrete",
        "model": {"id": str(flux_dir)}, "output": {"metadata": True}}})[-1]
    assert got["images"][0] == ours["images"][0]["base64"]


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_kohya_and_xlabs_loras_load_as_diffusers_loads_them(run, flux_dir, tmp_path, layout):
    """LoRAs as sd-scripts / ai-toolkit and XLabs save them (Black Forest Labs' key names, q, k
    and v fused) are read by diffusers' FLUX loader: the image is the one diffusers draws."""

    from tests.fixtures.flux import make_flux_lora_other_layout

    lora = make_flux_lora_other_layout(tmp_path / f"{layout}.safetensors", layout)
    fields = dict(prompt="a lighthouse", num_inference_steps=3, seed=6, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    styled, _ = run(**fields, loras=[{"id": str(lora), "scale": 0.7}])
    expected = diffusers_lora_image(flux_dir, lora, 0.7, seed=6)
    assert_images_close(expected, ours(styled), f"flux-{layout}-lora", tolerance=1)
    assert styled.images[0].base64 != plain.images[0].base64
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64


@pytest.mark.parametrize("cache", [{"method": "first_block", "threshold": 0.5}, {"method": "taylorseer", "interval": 2},
                                   {"method": "magcache", "threshold": 0.5}, {"method": "faster"}])
def test_step_caching_is_on_for_its_job_only(run, flux_dir, cache):
    """``cache``: diffusers' cache hooks on the transformer for this job (the image changes a
    little); the next job without it is the uncached image bit for bit."""
    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=8, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    cached, _ = run(**fields, cache=cache)
    assert cached.images[0].base64 != plain.images[0].base64
    assert cached.cache.method == cache["method"] and cached.cache.passes == 8  # what the answer says of it
    assert 0 < cached.cache.approximated < 8
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64


def test_step_caching_is_refused_where_the_denoiser_has_no_cache_hooks(run):
    with pytest.raises(UserInputError, match=r"^cache: the embedded model is an SD 1\.x/2\.x model: its "
                                             r"UNet2DConditionModel has no diffusers cache hooks"):
        run(prompt="p", num_inference_steps=2, cache={"method": "first_block"})


def test_a_cache_option_of_another_method_is_refused_by_field():
    from pydantic import ValidationError

    from schemas import InferenceRequest

    with pytest.raises(ValidationError, match=r"threshold: for first_block and magcache, not taylorseer"):
        InferenceRequest.model_validate({"prompt": "p", "cache": {"method": "taylorseer", "threshold": 0.1}})

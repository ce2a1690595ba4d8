"""SDXL's refiner (``refiner``): the model denoises up to ``switch``, the refiner the rest."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas import InferenceRequest, describe_validation_error
from tests.helpers import assert_images_close, circular, decode
from worker.errors import UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 4, "seed": 6}




def test_the_refiner_runs_the_last_steps(run, sdxl_dir, refiner_dir):
    xl = {"model": {"id": str(sdxl_dir)}, "scheduler": "EulerDiscrete"}
    plain, _ = run(**BASE, **xl)
    refined, events = run(**BASE, **xl, stream=True, refiner={"id": str(refiner_dir), "switch": 0.5})
    assert refined.images[0].base64 != plain.images[0].base64
    assert decode(refined.images[0].base64).size == (64, 64)
    assert [e.step for e in events if e.stage == "inference"] == [1, 2]  # the model: up to the switch
    assert [e.step for e in events if e.stage == "refiner"] == [1, 2]  # the refiner: the rest
    assert (refined.refiner.id, refined.refiner.source) == (str(refiner_dir), "local")
    assert refined.timings["refiner"] > 0 and "refiner_load" in refined.timings
    again, _ = run(**BASE, **xl, refiner={"id": str(refiner_dir), "switch": 0.5})
    assert again.images[0].base64 == refined.images[0].base64 and again.refiner.source == "memory"
    text = decode(run(**BASE, **xl, refiner={"id": str(refiner_dir), "switch": 0.5},
                      output={"metadata": True})[0].images[0].base64).info["parameters"]
    assert f"Refiner: {refiner_dir}, Refiner switch at: 0.5" in text
    later, _ = run(**BASE, **xl, refiner={"id": str(refiner_dir), "switch": 0.75})
    assert later.images[0].base64 not in (plain.images[0].base64, refined.images[0].base64)
    assert run(**BASE, **xl)[0].images[0].base64 == plain.images[0].base64


def test_a_refiner_needs_an_sdxl_model_on_both_sides(run, sdxl_dir, refiner_dir, tiny_dir):
    with pytest.raises(UserInputError, match=r"^refiner\.id: .* is not an SDXL model \(StableDiffusionPipeline\)"):
        run(**BASE, model={"id": str(sdxl_dir)}, refiner={"id": str(tiny_dir)})
    with pytest.raises(UserInputError, match=r"^refiner: the embedded model is not an SDXL model"):
        run(**BASE, refiner={"id": str(refiner_dir)})
    with pytest.raises(UserInputError, match=r"^model: .* is an SDXL refiner: send it as refiner, beside an SDXL"):
        run(**BASE, model={"id": str(refiner_dir)})


@pytest.mark.parametrize("fields, expected", [
    ({"refiner": {"switch": 0.8}}, "refiner.id: name the refiner (id, url or checkpoint_url)"),
    ({"refiner": {"id": "acme/r", "switch": 1}}, "refiner.switch: input should be less than 1"),
    ({"refiner": {"id": "acme/r"}, "hires": {}}, "refiner: not together with hires"),
    ({"refiner": {"id": "acme/r"}, "image": "iVBORw0KGgo"}, "refiner: only with task 'txt2img', not 'img2img'"),
    ({"refiner": {"id": "acme/r", "t5": False}}, "refiner.t5: a refiner is an SDXL model, with no T5 to leave out"),
])
def test_bad_refiner_fields_name_themselves(fields, expected):
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(BASE | fields)
    assert describe_validation_error(info.value).startswith(expected)


def test_each_batch_is_refined(engine, sdxl_dir, refiner_dir):
    """In batches, the model does its part for all of them first, then the refiner refines each."""
    from worker.engine import Engine

    one_at_a_time = Engine(engine.settings.model_copy(update={"max_batch_size": 1}))

    def job(**fields):
        request = InferenceRequest.model_validate(BASE | {"model": {"id": str(sdxl_dir)}, "scheduler": "EulerDiscrete",
                                                          "refiner": {"id": str(refiner_dir)}} | fields)
        return one_at_a_time.generate(request, lambda _: None, lambda: False)

    both = job(num_images=2)
    assert [i.base64 for i in both.images] == [job(seed=s).images[0].base64 for s in (6, 7)]
    assert both.refiner.source == "local"  # where it came from for the first batch


def test_a_seamless_image_wraps_in_the_refiners_steps_too(run, sdxl_dir, refiner_dir):
    """tiling: the refiner's UNet and VAE pad circularly as the model's do: the image is what
    diffusers draws with padding_mode="circular" on both pipelines, and both are plain after."""
    import torch
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline, EulerDiscreteScheduler

    xl = {"model": {"id": str(sdxl_dir)}, "scheduler": "EulerDiscrete",
          "refiner": {"id": str(refiner_dir), "switch": 0.5}}
    plain, _ = run(**BASE, **xl)
    tiled, _ = run(**BASE, **xl, tiling=True)

    pipes = []
    for path, kind in ((sdxl_dir, DiffusionPipeline), (refiner_dir, AutoPipelineForImage2Image)):
        pipe = kind.from_pretrained(path)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(circular(pipe))
    base, refiner = pipes
    generator = [torch.Generator("cpu").manual_seed(BASE["seed"])]
    common = dict(prompt=BASE["prompt"], num_inference_steps=4, guidance_scale=7.5, generator=generator)
    latents = base(**common, denoising_end=0.5, output_type="latent").images
    expected = refiner(**common, image=latents, denoising_start=0.5).images[0]
    assert_images_close(expected, decode(tiled.images[0].base64).convert("RGB"), "tiled-refiner")
    assert run(**BASE, **xl)[0].images[0].base64 == plain.images[0].base64

"""Variation seeds (the request's ``variation``, worker/variation.py): each image's noise turned
toward a second seed's, from the seed's own image (strength 0) to the variation seed's (1)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from schemas import describe_validation_error
from tests.helpers import assert_images_close, decode, pixels, png_b64

BASE = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 21}


@pytest.mark.parametrize("model", [None, "sdxl_dir", "sd3_dir"])
def test_the_ends_are_the_two_seeds_own_images(run, model, request):
    fields = BASE | ({"model": {"id": str(request.getfixturevalue(model))}} if model else {})
    own = run(**fields)[0].images[0]
    other = run(**(fields | {"seed": 500}))[0].images[0]
    start = run(**fields, variation={"seed": 500, "strength": 0})[0].images[0]
    end = run(**fields, variation={"seed": 500, "strength": 1})[0].images[0]
    assert start.base64 == own.base64 and start.variation_seed is None  # strength 0: no variation
    assert end.base64 == other.base64 and (end.seed, end.variation_seed) == (21, 500)


def test_small_strengths_make_small_changes(run):
    own = pixels(run(**BASE)[0].images[0])
    near, middle, far = (pixels(run(**BASE, variation={"seed": 500, "strength": t})[0].images[0])
                         for t in (0.05, 0.5, 0.95))
    other = pixels(run(**(BASE | {"seed": 500}))[0].images[0])
    assert 0 < np.abs(near - own).mean() < np.abs(middle - own).mean() < np.abs(other - own).mean()
    assert 0 < np.abs(far - other).mean() < np.abs(middle - other).mean()


def test_each_image_has_its_own_variation_seed_whatever_the_batches(run, engine):
    from schemas import InferenceRequest
    from worker.engine import Engine

    fields = BASE | {"num_images": 3, "variation": {"seed": 70, "strength": 1}}
    result, _ = run(**fields)
    assert [(i.seed, i.variation_seed) for i in result.images] == [(21, 70), (22, 71), (23, 72)]
    for i, image in enumerate(result.images):  # strength 1: each is its variation seed's own image
        assert_images_close(decode(run(**(BASE | {"seed": 70 + i}))[0].images[0].base64), decode(image.base64),
                            f"variation-{i}")
    one_by_one = Engine(engine.settings.model_copy(update={"max_batch_size": 1}))
    partway = fields | {"variation": {"seed": 70, "strength": 0.3}}
    alone = one_by_one.generate(InferenceRequest.model_validate(partway), lambda _: None, lambda: False).images
    together = run(**partway)[0].images
    assert [i.variation_seed for i in alone] == [i.variation_seed for i in together] == [70, 71, 72]
    for i, (a, b) in enumerate(zip(alone, together)):  # (batching moves values by ±1)
        assert_images_close(decode(b.base64), decode(a.base64), f"variation-batch-{i}")


def test_a_random_variation_seed_is_reported_and_written_in_the_metadata(run):
    result, _ = run(**BASE, variation={"strength": 0.4}, output={"metadata": True})
    image = result.images[0]
    assert isinstance(image.variation_seed, int) and 0 <= image.variation_seed < 2**63
    text = decode(image.base64).text["parameters"]
    assert f"Variation seed: {image.variation_seed}, Variation seed strength: 0.4" in text
    again = run(**BASE, variation={"seed": image.variation_seed, "strength": 0.4})[0].images[0]
    assert again.base64 != image.base64  # (the metadata differs) ...
    assert (pixels(again) == pixels(image)).all()  # ... the picture does not


def test_the_hires_pass_takes_the_varied_first_pass(run):
    """The first pass starts from the varied noise; the second's own noise is the seed's."""
    hires = {"scale": 1.5, "upscaler": "latent", "strength": 0.5}
    plain = pixels(run(**BASE, hires=hires)[0].images[0])
    varied = run(**BASE, hires=hires, variation={"seed": 500, "strength": 0.6})[0].images[0]
    assert varied.variation_seed == 500 and decode(varied.base64).size == (96, 96)
    assert (pixels(varied) != plain).any()
    assert (pixels(run(**BASE, hires=hires, variation={"seed": 500, "strength": 0})[0].images[0]) == plain).all()


@pytest.mark.parametrize("fields, expected", [
    ({"image": png_b64(), "variation": {"strength": 0.5}},
     "variation: only with task 'txt2img', not 'img2img' (img2img and inpainting draw their noise inside diffusers)"),
    ({"variation": {"strength": 1.5}}, "variation.strength: input should be less than or equal to 1, got 1.5"),
    ({"variation": {"seed": -1, "strength": 0.5}}, "variation.seed: input should be greater than or equal to 0"),
    ({"variation": {"seed": 3}}, "variation.strength: required"),
])
def test_bad_variations_name_the_field(run, fields, expected):
    with pytest.raises(ValidationError) as caught:
        run(**BASE, **fields)
    assert describe_validation_error(caught.value).startswith(expected), describe_validation_error(caught.value)

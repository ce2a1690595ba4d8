"""Seamless tiling (the request's ``tiling``, worker/seamless.py): the image wraps around, as
AUTOMATIC1111's Tiling makes it, on both axes or one, and the warm model is itself again for the
next job."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_images_close, circular, decode, pixels, png_b64

BASE = {"prompt": "a tiled floor", "num_inference_steps": 3, "seed": 5}


def test_tiling_draws_what_automatic1111s_circular_padding_draws(run, tiny_dir):
    import torch
    from diffusers import DiffusionPipeline

    plain = pixels(run(**BASE)[0])
    result, _ = run(**BASE, tiling=True, output={"metadata": True})
    image = decode(result.images[0].base64)

    pipe = circular(DiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=BASE["prompt"], num_inference_steps=3, guidance_scale=7.5,
                    generator=[torch.Generator("cpu").manual_seed(5)]).images[0]
    assert_images_close(expected, image.convert("RGB"), "tiling")
    assert np.abs(pixels(result) - plain).mean() > 1  # not the plain image
    assert "Tiling: True" in image.text["parameters"]

    # The warm model's layers are plain again: the next job draws the plain image, bit for bit.
    assert (pixels(run(**BASE)[0]) == plain).all()


def test_one_axis_wraps_and_the_other_does_not(tiny_dir):
    """With "x", what leaves the right edge comes back at the left: the denoiser and the VAE
    follow a sideways turn of their input around the edges exactly, but not one from top to
    bottom; without tiling, neither."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from worker.parts.seamless import wrapping

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)

    def denoise(x):
        return unet(x, 10, encoder_hidden_states=text).sample

    def follows(fn, turn, turn_out) -> bool:
        return torch.allclose(fn(turn(latents)), turn_out(fn(latents)), atol=1e-4)

    def sideways(n):
        return lambda x: x.roll(n, dims=-1)

    def downwards(n):
        return lambda x: x.roll(n, dims=-2)

    with torch.no_grad():
        with wrapping([unet, vae], "x"):
            assert follows(denoise, sideways(4), sideways(4))
            assert follows(lambda z: vae.decode(z).sample, sideways(3), sideways(24))  # 8 px a latent
            assert not follows(denoise, downwards(4), downwards(4))
        with wrapping([unet, vae], "y"):
            assert follows(denoise, downwards(4), downwards(4))
            assert not follows(denoise, sideways(4), sideways(4))
        assert not follows(denoise, sideways(4), sideways(4))  # plain again
        assert not follows(lambda z: vae.decode(z).sample, sideways(3), sideways(24))


def test_a_controlnet_sent_twice_wraps_and_is_plain_after(run, tmp_path, tiny_dir):
    from tests.fixtures.controlnets import build_controlnet

    net = {"id": str(build_controlnet(tiny_dir, tmp_path / "net")), "image": png_b64()}
    plain = pixels(run(**BASE, controlnets=[net, net])[0])
    assert (pixels(run(**BASE, controlnets=[net, net], tiling=True)[0]) != plain).any()
    assert (pixels(run(**BASE, controlnets=[net, net])[0]) == plain).all()


def test_each_axis_draws_its_own_image(run, sdxl_dir):
    sdxl = BASE | {"model": {"id": str(sdxl_dir)}}
    images = {str(tiling): pixels(run(**sdxl, tiling=tiling)[0]) for tiling in (False, "x", "y", True)}
    for a in images:
        for b in images:
            assert a == b or (images[a] != images[b]).any(), (a, b)


def test_large_seamless_images_skip_the_tiled_vae(engine, run):
    """The VAE's tiles would each wrap around on their own: a seamless image goes through whole."""
    from schemas import InferenceRequest
    from worker.engine import Engine

    small_tiles = Engine(engine.settings.model_copy(update={"vae_tiling_pixels": 64 * 64}))
    job = BASE | {"width": 128, "height": 128, "tiling": True}
    tiled_vae = small_tiles.generate(InferenceRequest.model_validate(job), lambda _: None, lambda: False)
    assert (pixels(tiled_vae) == pixels(run(**job)[0])).all()


@pytest.mark.parametrize("value", ["xy", "true", 1, None])
def test_tiling_takes_true_false_x_or_y(run, value):
    from pydantic import ValidationError

    from schemas.errors import describe_validation_error

    with pytest.raises(ValidationError) as caught:
        run(**BASE, tiling=value)
    assert describe_validation_error(caught.value) == f'tiling: must be true, false, "x" or "y", got {value!r}'


def test_sd3_models_refuse_tiling_by_name(run, sd3_dir):
    from worker.errors import UserInputError

    with pytest.raises(UserInputError, match=r"^tiling: .* SD3 model; seamless tiling needs a UNet"):
        run(**BASE, model={"id": str(sd3_dir)}, tiling=True)

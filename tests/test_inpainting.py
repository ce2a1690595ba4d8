"""Inpainting as AUTOMATIC1111 does it (worker/inpainting.py): a blurred mask edge, the input's
own pixels kept outside the mask, and only the masked area repainted at the working size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from tests.helpers import assert_images_close, decode, image_b64, pixels, png_b64

BASE = {"prompt": "a red door", "num_inference_steps": 2, "seed": 11}



def photo(size=(64, 64)) -> Image.Image:
    """Fine detail everywhere, which a VAE round trip cannot keep."""
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    image = Image.new("L", size)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    return image


def test_outside_the_mask_the_answer_is_the_input_itself(run):
    picture, square = photo(), mask()
    job = BASE | {"image": image_b64(picture), "mask_image": image_b64(square)}
    raw = pixels(run(**job, keep_unmasked=False, mask_blur=0)[0])  # diffusers' image: the VAE's pixels everywhere
    hard = pixels(run(**job, mask_blur=0)[0])
    inside = np.asarray(square) == 255
    assert (hard[~inside] == np.asarray(picture)[~inside]).all()  # the input's own pixels, exactly
    assert (hard[inside] == raw[inside]).all()  # the repainted square, as the pipeline drew it
    assert np.abs(raw[~inside] - np.asarray(picture)[~inside]).mean() > 10  # what keep_unmasked saves

    # The default blurs the edge (4 px): a band where the two blend, and beyond it the input.
    soft = pixels(run(**job)[0])
    blurred = np.asarray(square.filter(ImageFilter.GaussianBlur(4))).astype(int)
    assert (soft[blurred == 0] == np.asarray(picture)[blurred == 0]).all()
    band = (blurred > 40) & (blurred < 215)
    assert band.sum() > 100
    assert (soft[band] != hard[band]).any(axis=-1).mean() > 0.5


def test_only_the_masked_area_is_repainted_as_diffusers_does_it(run, engine, tiny_dir):
    """padding_mask_crop: the mask's box plus the padding is repainted at width x height and
    pasted back; the image keeps its size. The same image as diffusers' own padding_mask_crop."""
    import torch
    from diffusers import AutoPipelineForInpainting

    picture, square = photo((160, 96)), mask((160, 96), (100, 30, 123, 53))
    job = BASE | {"image": image_b64(picture), "mask_image": image_b64(square), "padding_mask_crop": 8, "width": 96,
                  "height": 96, "output": {"metadata": True}}
    result, _ = run(**job)
    image = decode(result.images[0].base64)
    assert image.size == (160, 96) == (result.images[0].width, result.images[0].height)

    pipe = AutoPipelineForInpainting.from_pretrained(tiny_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    blurred = square.filter(ImageFilter.GaussianBlur(4))
    expected = pipe(prompt=BASE["prompt"], image=picture, mask_image=blurred, padding_mask_crop=8, width=96,
                    height=96, strength=0.8, num_inference_steps=2, guidance_scale=7.5,
                    generator=[torch.Generator("cpu").manual_seed(11)]).images[0]
    assert_images_close(expected, image.convert("RGB"), "only-masked")
    x0, y0, x1, y1 = pipe.mask_processor.get_crop_region(blurred, 96, 96, pad=8)
    outside = np.ones((96, 160), dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (np.asarray(image.convert("RGB"))[outside] == np.asarray(picture)[outside]).all()
    # The 24 px square, its blurred edge and 8 px around, made square: a part of the image.
    assert x1 - x0 == y1 - y0 < 96 and x0 <= 100 - 8 - 4 and x1 >= 124 + 8 + 4

    text = image.text["parameters"]
    assert "Mask blur: 4" in text and "Inpaint area: Only masked" in text and "Masked area padding: 8" in text
    assert "Size: 96x96" in text  # A1111's Size: what the area was repainted at
    # Without a size, the area is repainted at the model's own (64 px for the tiny model).
    default = run(**(job | {"width": None, "height": None}))[0]
    assert pixels(default).shape == (96, 160, 3) and (pixels(default) != pixels(result)).any()


@pytest.mark.parametrize("model", ["sdxl_dir", "sd3_dir", "inpaint_dir"])
def test_only_masked_on_every_kind_of_model_and_batch(run, model, request):
    picture, square = photo((96, 80)), mask((96, 80), (40, 20, 60, 40))
    result, _ = run(**(BASE | {"model": {"id": str(request.getfixturevalue(model))}, "image": image_b64(picture),
                               "mask_image": image_b64(square), "padding_mask_crop": 4, "width": 64, "height": 64,
                               "num_images": 2}))
    first, second = (np.asarray(decode(i.base64).convert("RGB")) for i in result.images)
    assert first.shape == second.shape == (80, 96, 3)
    assert (first[:, :20] == np.asarray(picture)[:, :20]).all()  # far from the mask: the input
    assert (first != second).any()  # two seeds, two repaints


def test_the_control_image_is_cut_as_the_input_is(run, tmp_path_factory, tiny_dir):
    """With only masked, a ControlNet sees the same area of its image as the model of the input."""
    from tests.fixtures.controlnets import build_controlnet

    net = str(build_controlnet(tiny_dir, tmp_path_factory.mktemp("net") / "sd"))
    picture, square = photo((128, 96)), mask((128, 96), (90, 10, 110, 30))
    from diffusers.image_processor import VaeImageProcessor

    x0, y0, x1, y1 = VaeImageProcessor.get_crop_region(square.filter(ImageFilter.GaussianBlur(4)), 64, 64, pad=4)
    assert (x1 - x0) * (y1 - y0) < 128 * 96 / 4
    control = Image.new("RGB", (128, 96), (0, 0, 0))
    ImageDraw.Draw(control).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))  # white just there
    job = BASE | {"image": image_b64(picture), "mask_image": image_b64(square), "padding_mask_crop": 4, "width": 64,
                  "height": 64}
    near = pixels(run(**job, controlnets=[{"id": net, "image": image_b64(control)}])[0])
    white = pixels(run(**job, controlnets=[{"id": net, "image": png_b64((255, 255, 255), (128, 96))}])[0])
    black = pixels(run(**job, controlnets=[{"id": net, "image": png_b64((0, 0, 0), (128, 96))}])[0])
    assert (near == white).all() and (near != black).any()  # all of the area it sees is white


def test_mask_invert_repaints_the_black_of_the_mask(run):
    picture, square = photo(), mask()
    job = BASE | {"image": image_b64(picture), "mask_blur": 0}
    inverted = run(**(job | {"mask_image": image_b64(square), "mask_invert": True}))[0]
    plain = run(**(job | {"mask_image": image_b64(ImageOps.invert(square))}))[0]
    assert pixels(inverted).tolist() == pixels(plain).tolist()
    inside = np.asarray(square) == 255
    assert (pixels(inverted)[inside] == np.asarray(picture)[inside]).all()  # the white square kept


def test_masking_fields_are_checked(run, engine):
    from schemas import parse_request
    from worker.errors import UserInputError, answer_for

    image, hole = png_b64(size=(64, 64)), image_b64(mask())
    for fields, message in [
        ({"mask_blur": 2}, "mask_blur: only with task 'inpaint', not 'txt2img'"),
        ({"image": image, "padding_mask_crop": 8}, "padding_mask_crop: only with task 'inpaint', not 'img2img'"),
        ({"image": image, "mask_image": hole, "keep_unmasked": False, "padding_mask_crop": 8},
         "keep_unmasked: with padding_mask_crop the image outside the masked area is always kept"),
        ({"image": image, "mask_image": hole, "mask_blur": 65}, "mask_blur:"),
        ({"image": image, "mask_image": hole, "padding_mask_crop": -1}, "padding_mask_crop:"),
        ({"image": image, "mask_invert": True}, "mask_invert: only with task 'inpaint', not 'img2img'"),
    ]:
        with pytest.raises(Exception) as info:
            parse_request(BASE | fields, engine.settings.limits)
        answer, _ = answer_for(info.value, [])
        assert answer.startswith(message), answer
    with pytest.raises(UserInputError,
                       match="^mask_image: is black all over: no area to repaint for padding_mask_crop"):
        run(**(BASE | {"image": image, "mask_image": png_b64((0, 0, 0)), "padding_mask_crop": 8}))
    # Without only masked, a black mask repaints nothing: the input comes back.
    result, _ = run(**(BASE | {"image": image_b64(photo()), "mask_image": png_b64((0, 0, 0))}))
    assert (pixels(result) == np.asarray(photo())).all()


def test_outpainting_paints_margins_that_continue_the_image(run, engine, inpaint_dir):
    """outpaint: the same as inpainting the grown canvas under the margins' mask; the image itself
    comes back as it was, away from the blended seam."""
    picture = photo((64, 64))
    result, _ = run(**(BASE | {"image": image_b64(picture), "outpaint": {"right": 32, "top": 8},
                               "output": {"metadata": True}}))
    assert result.task == "inpaint"
    image = decode(result.images[0].base64)
    assert image.size == (96, 72) and (result.images[0].width, result.images[0].height) == (96, 72)
    out = np.asarray(image.convert("RGB")).astype(int)
    assert (out[8 + 16:, :64 - 16] == np.asarray(picture)[16:, :48]).all()  # the image, beyond the blur's reach

    canvas = np.pad(np.asarray(picture), ((8, 0), (0, 32), (0, 0)), mode="edge")
    margins = mask((96, 72), (64, 0, 95, 71))
    margins.paste(255, (0, 0, 96, 8))
    by_hand, _ = run(**(BASE | {"image": image_b64(Image.fromarray(canvas)), "mask_image": image_b64(margins)}))
    assert pixels(by_hand).tolist() == out.tolist()
    assert (out[40:, 80:] != canvas[40:, 80:]).any()  # the margin was painted, not left stretched
    assert 'Outpaint: "left 0, right 32, top 8, bottom 0, fill edge"' in image.text["parameters"]

    mirrored, _ = run(**(BASE | {"image": image_b64(picture), "outpaint": {"right": 32, "top": 8, "fill": "reflect"}}))
    assert pixels(mirrored).tolist() != out.tolist()
    # On an inpainting model, and only the margin's area at the model's size.
    for fields in ({"model": {"id": str(inpaint_dir)}}, {"padding_mask_crop": 8}):
        grown, _ = run(**(BASE | {"image": image_b64(picture), "outpaint": {"left": 40}} | fields))
        assert decode(grown.images[0].base64).size == (104, 64)


def test_outpainting_fields_are_checked(run, engine):
    from schemas import parse_request
    from worker.errors import answer_for

    image = image_b64(photo())
    for fields, message in [
        ({"image": image, "outpaint": {}}, "outpaint.left: at least one of left, right, top, bottom must add pixels"),
        ({"image": image, "outpaint": {"right": 8}, "mask_image": image},
         "mask_image: not with outpaint, which masks the margins it adds"),
        ({"image": image, "task": "img2img", "outpaint": {"right": 8}}, "outpaint: only with task 'inpaint'"),
        ({"outpaint": {"right": 8}}, "image: required for task 'inpaint'"),
        ({"task": "txt2img", "outpaint": {"right": 8}}, "outpaint: not used by task 'txt2img'"),
        ({"image": image, "outpaint": {"right": 4096}}, "outpaint.right: input should be less than or equal to 2048"),
        ({"image": image, "outpaint": {"right": 8, "fill": "noise"}}, "outpaint.fill: input should be 'edge' or"),
        ({"image": image, "outpaint": {"right": 8}, "mask_invert": True}, "mask_invert: not with outpaint"),
    ]:
        with pytest.raises(Exception) as info:
            parse_request(BASE | fields, engine.settings.limits)
        answer, _ = answer_for(info.value, [])
        assert answer.startswith(message), answer
    from worker.errors import UserInputError

    with pytest.raises(UserInputError, match=r"^outpaint: 2112x2112 is over this endpoint's 4194304 pixels"):
        run(**(BASE | {"image": image, "outpaint": {"left": 2048, "top": 2048}}))

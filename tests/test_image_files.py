"""Image files in and out: what an input image may weigh, and how the parameters of an
answered image fit in its file."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.helpers import decode
from worker.errors import UserInputError


def test_long_prompts_fit_a_jpegs_metadata_and_longer_ones_are_refused_before_the_work(run):
    """A JPEG holds 64 KB of EXIF: a 20,000-character prompt keeps its whole text in the UTF-16
    UserComment (its ASCII copy gives way); prompts that cannot fit are refused up front."""
    from pydantic import ValidationError

    prompt = "a lighthouse on a cliff, " * 800  # 20,000 characters
    result, _ = run(prompt=prompt, num_inference_steps=2, seed=1, output={"format": "jpeg", "metadata": True})
    comment = decode(result.images[0].base64).getexif().get_ifd(0x8769)[0x9286]
    text = comment.removeprefix(b"UNICODE\0").decode("utf-16-be")
    assert text.startswith(prompt + "\n") and "Steps: 2" in text
    with pytest.raises(ValidationError, match=r"output\.metadata: the prompts \(36000 characters\) do not fit in a "
                                              r"JPEG's 64 KB of EXIF \(at most 30000\); send output\.format png"):
        run(prompt=prompt, negative_prompt="fog " * 4000, output={"format": "jpeg", "metadata": True})
    assert run(prompt=prompt, negative_prompt="fog " * 4000, num_inference_steps=2,
               output={"format": "png", "metadata": True})[0].images


def test_what_does_not_fit_a_jpeg_is_cut_never_failed():
    """The encoder's own guard, under the request check: a text too long for EXIF is cut."""
    from PIL import Image

    from worker.images import encode_image

    text = "é" * 40_000
    image = decode(base64.b64encode(encode_image(Image.new("RGB", (8, 8)), "jpeg", None, text)).decode())
    kept = image.getexif().get_ifd(0x8769)[0x9286].removeprefix(b"UNICODE\0").decode("utf-16-be")
    assert 30_000 < len(kept) < 40_000 and text.startswith(kept)


def test_oversized_input_images_are_refused_before_decoding(models_dir):
    from worker.images import load_image
    from worker.settings import Settings

    small = Settings(models_dir=models_dir, max_input_image_bytes=2048)
    big = base64.b64encode(b"\x89PNG" + bytes(4000)).decode()
    with pytest.raises(UserInputError, match=r"^image: is 4005 bytes, over the 2048 this endpoint allows "
                                             r"\(MAX_INPUT_IMAGE_BYTES\)"):
        load_image(big, "image", small)
    with pytest.raises(UserInputError, match=r"^mask_image: is 4005 bytes"):
        load_image("data:image/png;base64," + big, "mask_image", small)
    # A decompression bomb: a small file of far too many pixels is too large, not unreadable.
    buffer = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, format="PNG")
    with pytest.raises(UserInputError, match=r"^image: is too large for this endpoint \(more than \d+ pixels\)"):
        load_image(base64.b64encode(buffer.getvalue()).decode(), "image", Settings(models_dir=models_dir))

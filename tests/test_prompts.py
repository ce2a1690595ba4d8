"""Prompts as AUTOMATIC1111 reads them (worker/prompts.py): longer than CLIP's 77-token
window, and weighted.

The tiny models' tokenizer gives one token per character, so "lighthouse " * 10 is 100 tokens:
a tail after it lies past the window that diffusers would cut at.
"""

from __future__ import annotations

import pytest
import torch

from worker.families.sd import SD
from worker.families.sdxl import SDXL
from worker.parts import prompts
from worker.sources.loading import load_pipeline

LONG = "lighthouse " * 10  # 100 tokens
BASE = {"num_inference_steps": 2, "seed": 5}


def draw(run, **fields) -> str:
    result, _ = run(**(BASE | fields))
    return result.images[0].base64


@pytest.mark.parametrize("model", ["embedded", "sdxl"])
def test_words_past_the_window_change_the_image(run, request, model):
    spec = {} if model == "embedded" else {"model": {"id": str(request.getfixturevalue("sdxl_dir"))}}
    red, blue = draw(run, prompt=LONG + "red", **spec), draw(run, prompt=LONG + "blue", **spec)
    assert red != blue
    assert draw(run, prompt=LONG + "red", **spec) == red  # still reproducible
    # The negative prompt too, and either may be the long one.
    calm, stormy = (draw(run, prompt="sea", negative_prompt=LONG + tail, **spec) for tail in ("calm", "stormy"))
    assert calm != stormy


def test_long_prompts_run_every_task_and_several_images(run):
    from tests.helpers import png_b64

    result, _ = run(prompt=LONG + "red", num_images=2, **BASE)
    assert len({image.base64 for image in result.images}) == 2
    for fields in ({"image": png_b64()}, {"image": png_b64(), "mask_image": png_b64((255, 255, 255))}):
        red, blue = draw(run, prompt=LONG + "red", **fields), draw(run, prompt=LONG + "blue", **fields)
        assert red != blue


def test_clip_skip_applies_to_long_prompts(run):
    assert draw(run, prompt=LONG + "red", clip_skip=1) != draw(run, prompt=LONG + "red")


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_one_window_is_encoded_exactly_as_diffusers_does(tiny_dir, sdxl_dir, clip_skip):
    """The windows are diffusers' own encoding, repeated: for a prompt that fits, the same tensors."""
    text = "a lighthouse at dawn"
    sd = load_pipeline(tiny_dir, "fp32", None, "cpu")
    ours = SD._encode(sd, prompts._windows(sd, sd.tokenizer, [(text, 1.0)]), 1, clip_skip)
    theirs, _ = sd.encode_prompt(text, "cpu", 1, False, clip_skip=clip_skip)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    xl = load_pipeline(sdxl_dir, "fp32", None, "cpu")
    windows = [prompts._windows(xl, t, [(text, 1.0)]) for t in (xl.tokenizer, xl.tokenizer_2)]
    embeds, pooled = SDXL._encode_both(xl, windows, 1, clip_skip)
    their_embeds, _, their_pooled, _ = xl.encode_prompt(text, device="cpu", do_classifier_free_guidance=False,
                                                        clip_skip=clip_skip)
    torch.testing.assert_close(embeds, their_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, their_pooled, rtol=0, atol=0)


def test_prompts_that_fit_are_left_to_the_pipeline(tiny_dir):
    sd = load_pipeline(tiny_dir, "fp32", None, "cpu")
    assert prompts.encoded(SD, sd, "x" * 75, "y" * 75, None) is None
    long = prompts.encoded(SD, sd, "x" * 76, None, None)
    assert long["prompt_embeds"].shape[1] == long["negative_prompt_embeds"].shape[1] == 2 * 77


@pytest.mark.parametrize("prompt, pieces", [
    ("a red door", [("a red door", 1.0)]),
    ("a (red) door", [("a ", 1.0), ("red", 1.1), (" door", 1.0)]),
    ("a [red] door", [("a ", 1.0), ("red", 1 / 1.1), (" door", 1.0)]),
    ("a (red:1.5) door", [("a ", 1.0), ("red", 1.5), (" door", 1.0)]),
    ("((red:1.5) door)", [("red", 1.5 * 1.1), (" door", 1.1)]),
    ("(red: .5 )", [("red", 0.5)]),
    ("(red:-1)", [("red", -1.0)]),
    (r"\(red\) [door\]", [("(red) ", 1.0), ("door]", 1 / 1.1)]),
    ("a red) door", [("a red) door", 1.0)]),  # nothing to close: a character
    ("(a:b) c", [("a:b", 1.1), (" c", 1.0)]),  # not a number: the colon is text
    ("(unclosed", [("unclosed", 1.1)]),
    ("sea BREAK (sky)", [("sea", 1.0), (None, 1.0), ("sky", 1.1)]),
    ("", [("", 1.0)]),
])
def test_attention_syntax(prompt, pieces):
    parsed = prompts.parse(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in pieces]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in pieces])


@pytest.mark.parametrize("model", ["embedded", "sdxl"])
def test_weights_change_the_image_and_a_neutral_weight_does_not(run, request, model):
    spec = {} if model == "embedded" else {"model": {"id": str(request.getfixturevalue("sdxl_dir"))}}
    plain = draw(run, prompt="a red door", **spec)
    assert draw(run, prompt="a (red:1.0) door", **spec) == plain  # the same tokens, weighed 1: diffusers' image
    assert draw(run, prompt="a (red:1.5) door", **spec) != plain
    assert draw(run, prompt="a red door", negative_prompt="(blurry:1.4)", **spec) != draw(
        run, prompt="a red door", negative_prompt="blurry", **spec)


def test_escaped_brackets_and_prompt_weighting_false_read_the_characters(run):
    literal = draw(run, prompt="a (red:1.5) door", prompt_weighting=False)
    assert literal != draw(run, prompt="a (red:1.5) door")
    assert draw(run, prompt=r"a \(red:1.5\) door") == literal


def test_break_starts_a_new_window(tiny_dir):
    sd = load_pipeline(tiny_dir, "fp32", None, "cpu")
    assert prompts.encoded(SD, sd, "sea BREAK sky", None, None)["prompt_embeds"].shape[1] == 2 * 77
    assert prompts.encoded(SD, sd, "sea BREAK sky", None, None, weighting=False) is None  # the word, read as one


def test_docker_diffusers_api_prompts_stay_literal():
    from schemas import Limits, parse_request

    legacy = parse_request({"callInputs": {}, "modelInputs": {"prompt": "a (red:1.5) door"}}, Limits())
    assert legacy.prompt_weighting is False
    assert parse_request({"prompt": "a (red:1.5) door"}, Limits()).prompt_weighting is True

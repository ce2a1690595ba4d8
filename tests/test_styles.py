"""Prompt styles (the request's ``styles``, STYLES_FILE): AUTOMATIC1111's styles.csv, applied as
its web UI applies them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas import describe_validation_error, parse_request

# As AUTOMATIC1111 writes the file: a header, quoted fields, a byte-order mark from Excel.
STYLES_CSV = ('\ufeffname,prompt,negative_prompt\n'
              '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
              'Sharp,"sharp focus, 8k",\n'
              ',"a row without a name",\n')


@pytest.fixture
def styled(engine, tmp_path):
    from worker.engine import Engine

    path = tmp_path / "styles.csv"
    path.write_text(STYLES_CSV, encoding="utf-8")
    settings = engine.settings.model_copy(update={"styles_file": path})
    settings = type(settings).model_validate(settings.model_dump())  # read as at start-up
    return Engine(settings)


def test_styles_read_the_web_uis_file(styled):
    assert styled.settings.limits.styles == {
        "Cinematic": ("cinematic still of {prompt}, film grain", "cartoon, drawing"),
        "Sharp": ("sharp focus, 8k", ""),
    }


def test_styles_apply_in_order_and_draw_the_styled_prompts_image(styled):
    request = parse_request({"prompt": "a cat", "negative_prompt": "blurry", "styles": ["Cinematic", "Sharp"],
                             "num_inference_steps": 2, "seed": 4}, styled.settings.limits)
    assert request.prompt == "cinematic still of a cat, film grain, sharp focus, 8k"
    assert request.negative_prompt == "blurry, cartoon, drawing"
    bare = parse_request({"prompt": "a cat", "styles": ["Sharp"]}, styled.settings.limits)
    assert (bare.prompt, bare.negative_prompt) == ("a cat, sharp focus, 8k", None)
    hires = parse_request({"prompt": "a cat", "styles": ["Cinematic"], "hires": {"prompt": "a cat, fur detail"}},
                          styled.settings.limits).hires  # as AUTOMATIC1111 styles its hires prompt
    assert (hires.prompt, hires.negative_prompt) == ("cinematic still of a cat, fur detail, film grain", None)

    styled_image = styled.generate(request, lambda _: None, lambda: False).images[0]
    written = parse_request({"prompt": "cinematic still of a cat, film grain, sharp focus, 8k",
                             "negative_prompt": "blurry, cartoon, drawing", "num_inference_steps": 2, "seed": 4},
                            styled.settings.limits)
    assert styled_image.base64 == styled.generate(written, lambda _: None, lambda: False).images[0].base64


def test_an_automatic1111_payloads_styles_apply_too(styled):
    request = parse_request({"prompt": "a cat", "steps": 2, "styles": ["Cinematic"]}, styled.settings.limits)
    assert (request.prompt, request.negative_prompt) == ("cinematic still of a cat, film grain", "cartoon, drawing")


def test_unknown_styles_name_the_entry_and_what_the_endpoint_has(styled, engine):
    with pytest.raises(ValidationError) as caught:
        parse_request({"prompt": "a cat", "styles": ["Sharp", "Anime"]}, styled.settings.limits)
    assert describe_validation_error(caught.value) == (
        "styles[1]: no style 'Anime' on this endpoint (it has: Cinematic, Sharp)")
    with pytest.raises(ValidationError) as caught:  # no STYLES_FILE: no styles
        parse_request({"prompt": "a cat", "styles": ["Sharp"]}, engine.settings.limits)
    assert describe_validation_error(caught.value) == "styles[0]: no style 'Sharp' on this endpoint (it has: none)"


@pytest.mark.parametrize("content, expected", [
    (None, "STYLES_FILE: cannot read"),
    ("title,text\nx,y\n", "has no 'name' column"),
])
def test_a_styles_file_that_cannot_serve_stops_the_worker_at_start(tmp_path, content, expected):
    from worker.settings import Settings

    path = tmp_path / "styles.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match=expected):
        Settings(styles_file=path)

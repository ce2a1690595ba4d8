"""Textual-inversion embeddings for one request (worker.parts.embeddings): new words, gone afterwards."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import BUCKET, RangeServer

PROMPT = {"prompt": "a <papercut> lighthouse", "num_inference_steps": 2, "seed": 8}


def vector(seed: int, rows: int = 1, width: int = 32) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    save_file({"<papercut>": vector(1)[0]}, root / "papercut.safetensors")  # diffusers' layout
    save_file({"emb_params": vector(2, rows=2)}, root / "EasyNegative.safetensors")  # AUTOMATIC1111's
    save_file({"clip_l": vector(3), "clip_g": vector(4, width=48)}, root / "xl-style.safetensors")  # SDXL's
    return root


def draw(run, **fields):
    result, events = run(**(PROMPT | fields))
    return result.images[0].base64


def test_an_embedding_gives_its_word_a_meaning_for_that_request_only(run, files):
    plain = draw(run)  # "<papercut>" is just characters to this tokenizer
    styled = draw(run, embeddings=[{"id": str(files / "papercut.safetensors")}])
    assert styled != plain
    assert draw(run, embeddings=[{"id": str(files / "papercut.safetensors")}]) == styled
    assert draw(run) == plain  # the word is gone again


def test_automatic1111_embeddings_are_called_by_their_file_name_or_token(run, files):
    prompt = {"prompt": "a lighthouse", "negative_prompt": "EasyNegative"}
    plain = draw(run, **prompt)
    by_name = draw(run, **prompt, embeddings=[{"id": str(files / "EasyNegative.safetensors")}])
    assert by_name != plain
    by_token = draw(run, prompt="a lighthouse", negative_prompt="easyneg",
                    embeddings=[{"id": str(files / "EasyNegative.safetensors"), "token": "easyneg"}])
    assert by_token == by_name
    assert draw(run, **prompt) == plain


def test_embedding_from_a_url_keeps_its_name(run, files):
    server = RangeServer({"/dl/EasyNegative.safetensors": (files / "EasyNegative.safetensors").read_bytes()})
    try:
        prompt = {"prompt": "a lighthouse", "negative_prompt": "EasyNegative"}
        local = draw(run, **prompt, embeddings=[{"id": str(files / "EasyNegative.safetensors")}])
        fetched = draw(run, **prompt, embeddings=[{"url": f"{server.url}/dl/EasyNegative.safetensors"}])
        assert fetched == local
    finally:
        server.close()


def test_sdxl_embeddings_fill_both_text_encoders(run, files, sdxl_dir):
    model = {"model": {"id": str(sdxl_dir)}, "prompt": "a xl-style lighthouse"}
    plain = draw(run, **model)
    styled = draw(run, **model, embeddings=[{"id": str(files / "xl-style.safetensors")}])
    assert styled != plain and draw(run, **model) == plain
    with pytest.raises(Exception, match=r"^embeddings\[0\]: is not an SDXL embedding"):
        draw(run, **model, embeddings=[{"id": str(files / "papercut.safetensors")}])
    with pytest.raises(Exception, match=r"^embeddings\[0\]: is an SDXL embedding"):
        draw(run, embeddings=[{"id": str(files / "xl-style.safetensors")}])


def test_an_embedding_that_does_not_fit_names_the_field_and_leaves_nothing_behind(run, tmp_path):
    plain = draw(run)
    wrong = tmp_path / "wide.safetensors"
    save_file({"<papercut>": vector(5, width=768)[0]}, wrong)  # SD 1.5's width, not this model's
    with pytest.raises(Exception, match=r"^embeddings\[0\]: cannot be added to this model"):
        draw(run, embeddings=[{"id": str(wrong)}])
    assert draw(run) == plain


def test_embedding_from_s3_through_a_fresh_worker(settings, s3, files):
    from schemas import InferenceRequest
    from worker.engine import Engine

    s3.put_object(Bucket=BUCKET, Key="emb/papercut.safetensors", Body=(files / "papercut.safetensors").read_bytes())
    request = InferenceRequest.model_validate(PROMPT | {"embeddings": [{"url": f"s3://{BUCKET}/emb/papercut.safetensors"}]})
    result = Engine(settings).generate(request, lambda event: None, lambda: False)
    assert "embeddings" in result.timings

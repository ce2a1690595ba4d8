"""LoRAs for one request (worker.parts.loras): applied, weighted, fetched, and gone afterwards."""

from __future__ import annotations

import hashlib
import pickle

import pytest
from safetensors.torch import save_file

from tests.fixtures.lora_files import make_lora
from tests.helpers import BUCKET, RangeServer, assert_images_close, decode, hub_cache
from worker.errors import UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": make_lora(tiny_dir, root / "style" / "style.safetensors", seed=1),
        "other": make_lora(tiny_dir, root / "other" / "other.safetensors", seed=2),
        "with_text": make_lora(tiny_dir, root / "text" / "with_text.safetensors", seed=1, text_encoder=True),
    }


def image_of(run, **fields):
    result, events = run(**(BASE | fields))
    return decode(result.images[0].base64), result, events


def differs(a, b) -> bool:
    try:
        assert_images_close(a, b, "lora-check", tolerance=2)
        return False
    except AssertionError:
        return True


def test_a_lora_changes_the_image_for_that_request_only(run, lora_files):
    plain, _, _ = image_of(run)
    styled, result, _ = image_of(run, loras=[{"id": str(lora_files["style"]), "scale": 1.0}])
    assert differs(plain, styled)
    assert "loras" in result.timings
    again, _, _ = image_of(run, loras=[{"id": str(lora_files["style"])}])
    assert_images_close(styled, again, "lora-reproduces", tolerance=0)
    # The next request without it gets the plain model back.
    after, _, _ = image_of(run)
    assert_images_close(plain, after, "lora-not-leaked", tolerance=0)


def test_scale_weighs_the_lora(run, lora_files):
    plain, _, _ = image_of(run)
    off, _, _ = image_of(run, loras=[{"id": str(lora_files["style"]), "scale": 0}])
    assert_images_close(plain, off, "lora-scale-0", tolerance=0)
    half, _, _ = image_of(run, loras=[{"id": str(lora_files["style"]), "scale": 0.5}])
    full, _, _ = image_of(run, loras=[{"id": str(lora_files["style"]), "scale": 1.0}])
    assert differs(half, full) and differs(half, plain)


def test_several_loras_combine(run, lora_files):
    one, _, _ = image_of(run, loras=[{"id": str(lora_files["style"])}])
    other, _, _ = image_of(run, loras=[{"id": str(lora_files["other"])}])
    both, _, _ = image_of(run, loras=[{"id": str(lora_files["style"])}, {"id": str(lora_files["other"])}])
    assert differs(both, one) and differs(both, other)


def test_text_encoder_layers_are_applied_too(run, lora_files):
    unet_only, _, _ = image_of(run, loras=[{"id": str(lora_files["style"])}])
    with_text, _, _ = image_of(run, loras=[{"id": str(lora_files["with_text"])}])  # same UNet layers (seed 1)
    assert differs(unet_only, with_text)
    plain, _, _ = image_of(run)
    after, _, _ = image_of(run)
    assert_images_close(plain, after, "text-lora-not-leaked", tolerance=0)


def test_lora_from_a_url_is_verified_fetched_once_and_cached(run, lora_files, engine):
    data = lora_files["other"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    server = RangeServer({"/other.safetensors": data})
    try:
        expected, _, _ = image_of(run, loras=[{"id": str(lora_files["other"])}])
        url = f"{server.url}/other.safetensors#sha256={digest}"
        got, _, events = image_of(run, stream=True, loras=[{"url": url}])
        assert_images_close(expected, got, "lora-from-url", tolerance=0)
        assert any(event.stage == "download" for event in events)
        fetched = len(server.requests)
        image_of(run, loras=[{"url": url}])
        assert len(server.requests) == fetched  # from MODELS_DIR/loras now
        bad = f"{server.url}/other.safetensors#sha256={'0' * 64}"
        with pytest.raises(Exception, match=r"^loras\[0\]\.url: sha256 mismatch"):
            image_of(run, loras=[{"url": bad}])
    finally:
        server.close()


def test_lora_from_s3(run, lora_files, settings, s3):
    from schemas import InferenceRequest
    from worker.engine import Engine

    s3.put_object(Bucket=BUCKET, Key="loras/style.safetensors", Body=lora_files["style"].read_bytes())
    expected, _, _ = image_of(run, loras=[{"id": str(lora_files["style"])}])
    request = InferenceRequest.model_validate(BASE | {"loras": [{"url": f"s3:///{BUCKET}/loras/style.safetensors"}]})
    result = Engine(settings).generate(request, lambda event: None, lambda: False)
    assert_images_close(expected, decode(result.images[0].base64), "lora-from-s3", tolerance=0)


def test_lora_from_a_hub_cache(tiny_dir, lora_files, settings, tmp_path):
    from schemas import InferenceRequest
    from worker.engine import Engine

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytorch_lora_weights.safetensors").write_bytes(lora_files["style"].read_bytes())
    hub_cache(settings.runpod_hf_cache, "someone/tiny-style", repo, {"main": "a" * 40})
    engine = Engine(settings.model_copy(update={"model_id": str(tiny_dir)}))
    request = InferenceRequest.model_validate(BASE | {"loras": [{"id": "someone/tiny-style"}]})
    styled = engine.generate(request, lambda event: None, lambda: False)
    request = InferenceRequest.model_validate(BASE | {"loras": [{"id": str(lora_files["style"])}]})
    expected = engine.generate(request, lambda event: None, lambda: False)
    assert styled.images[0].base64 == expected.images[0].base64
    missing = InferenceRequest.model_validate(BASE | {"loras": [{"id": "someone/not-cached"}]})
    with pytest.raises(Exception, match=r"^loras\[0\]\.id: someone/not-cached is not cached on this worker"):
        engine.generate(missing, lambda event: None, lambda: False)


def test_unusable_loras_name_the_field_and_leave_the_model_clean(run, tmp_path, lora_files):
    plain, _, _ = image_of(run)
    # Layers whose shapes do not fit this model.
    wrong = tmp_path / "wrong.safetensors"
    import torch

    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 7),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(7, 4)},
              wrong)
    with pytest.raises(Exception, match=r"^loras\[1\]: cannot be applied to this model"):
        image_of(run, loras=[{"id": str(lora_files["style"])}, {"id": str(wrong)}])
    # A pickle is not loaded at all.
    pickled = tmp_path / "evil.safetensors"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(Exception, match=r"^loras\[0\]\.id: .* is not a \.safetensors file"):
        image_of(run, loras=[{"id": str(pickled)}])
    for special in ("/proc/self/mem", "/proc/self/environ", "/dev/zero"):  # not read at all, let alone loaded
        with pytest.raises(UserInputError, match=rf"^loras\[0\]\.id: {special} is not a \.safetensors file"):
            image_of(run, loras=[{"id": special}])
    server = RangeServer({"/evil.safetensors": pickle.dumps({"x": 1})})
    try:
        with pytest.raises(Exception, match=r"^loras\[0\]\.url: is not a \.safetensors file"):
            image_of(run, loras=[{"url": f"{server.url}/evil.safetensors"}])
    finally:
        server.close()
    after, _, _ = image_of(run)
    assert_images_close(plain, after, "failed-lora-not-leaked", tolerance=0)


def test_loras_stay_loaded_for_the_next_request_up_to_the_cap(engine, lora_files):
    from schemas import InferenceRequest
    from worker.engine import Engine

    capped = Engine(engine.settings.model_copy(update={"max_loaded_loras": 1}))

    def draw(*names, **scales):
        loras = [{"id": str(lora_files[name]), "scale": scales.get(name, 1.0)} for name in names]
        request = InferenceRequest.model_validate(BASE | {"loras": loras})
        result = capped.generate(request, lambda event: None, lambda: False)
        resident = capped.models.loaded()[0].loras
        return result, len(resident)

    first, resident = draw("style")
    assert resident == 1
    _, resident = draw("style", "other")  # a request may hold more than the cap ...
    assert resident == 2
    _, resident = draw("other")  # ... and the least recently used leave after it
    assert resident == 1
    again, resident = draw("style")  # loaded anew, the same image
    assert resident == 1 and again.images[0].base64 == first.images[0].base64


def test_unet_and_text_encoder_loras_together(run, lora_files):
    plain, _, _ = image_of(run)
    text_only_layers, _, _ = image_of(run, loras=[{"id": str(lora_files["with_text"])}])
    both, _, _ = image_of(run, loras=[{"id": str(lora_files["with_text"])}, {"id": str(lora_files["other"])}])
    assert differs(both, text_only_layers) and differs(both, plain)
    after, _, _ = image_of(run)
    assert_images_close(plain, after, "mixed-loras-not-leaked", tolerance=0)


def test_the_same_lora_twice_is_refused(run, lora_files):
    with pytest.raises(Exception, match=r"^loras: the same LoRA is listed twice"):
        image_of(run, loras=[{"id": str(lora_files["style"])}, {"id": str(lora_files["style"]), "scale": 0.5}])


def test_a_failed_fetch_keeps_the_loras_already_loaded(run, engine, lora_files):
    image_of(run, loras=[{"id": str(lora_files["style"])}])
    loaded = next(loaded for loaded in engine.models.loaded() if loaded.loras)
    before = dict(loaded.loras)
    with pytest.raises(Exception, match=r"^loras\[1\]\.id: /nowhere/x\.safetensors is not a \.safetensors file"):
        image_of(run, loras=[{"id": str(lora_files["style"])}, {"id": "/nowhere/x.safetensors"}])
    assert dict(loaded.loras) == before  # nothing was unloaded: the next use of style is a switch

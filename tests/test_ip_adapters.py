"""IP-Adapters per request (worker/ip_adapters.py), on tiny random-weight adapters laid out as
h94/IP-Adapter is (tests/ip_adapters.py)."""

from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError

from schemas import InferenceRequest, describe_validation_error
from tests.fixtures.ip_adapters import WEIGHTS, build_ip_adapter
from tests.helpers import BLUE, RED, hub_cache
from worker.errors import JobCancelled, ModelSourceError, UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def adapters(tiny_dir, sdxl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ip-adapters")
    return {"sd": build_ip_adapter(tiny_dir, root / "sd"), "sdxl": build_ip_adapter(sdxl_dir, root / "sdxl")}


def draw(run, **fields) -> str:
    return run(**(BASE | fields))[0].images[0].base64


def reference(folder, image=RED, **extra) -> dict:
    return {"id": str(folder), "weight_name": WEIGHTS, "image": image} | extra


def test_a_reference_image_steers_for_that_request_only(run, adapters):
    plain = draw(run)
    red = draw(run, ip_adapter=reference(adapters["sd"]))
    assert red != plain
    assert draw(run, ip_adapter=reference(adapters["sd"])) == red  # reproducible
    assert draw(run, ip_adapter=reference(adapters["sd"], BLUE)) != red  # the image is what steers
    assert draw(run, ip_adapter=reference(adapters["sd"], scale=0)) == plain  # 0: no steering, bit for bit
    assert draw(run) == plain  # taken off the shared UNet after the job


def test_ip_adapters_with_hires_controlnets_and_on_sdxl(run, adapters, sdxl_dir, tiny_dir, tmp_path):
    from tests.fixtures.controlnets import build_controlnet

    image = run(**BASE, hires={"scale": 1.5}, ip_adapter=reference(adapters["sd"]),
                controlnets=[{"id": str(build_controlnet(tiny_dir, tmp_path / "net")), "image": BLUE}])[0].images[0]
    assert (image.width, image.height) == (96, 96)
    xl = {"model": {"id": str(sdxl_dir)}}
    plain = draw(run, **xl)
    assert draw(run, **xl, ip_adapter=reference(adapters["sdxl"])) != plain
    with pytest.raises(UserInputError, match=r"^ip_adapter: does not fit this model \(an IP-Adapter for another"):
        draw(run, **xl, ip_adapter=reference(adapters["sd"]))
    assert draw(run, **xl) == plain  # a failed load leaves the model plain


def test_a_cancelled_job_leaves_the_model_plain(run, adapters):
    plain = draw(run)
    with pytest.raises(JobCancelled):
        run(cancelled=lambda: True, **BASE, ip_adapter=reference(adapters["sd"]))
    assert draw(run) == plain


def test_ip_adapters_from_the_hub_and_incomplete_ones(settings, adapters, tmp_path):
    from worker.engine import Engine

    hub = hub_cache(tmp_path / "hub", "acme/ip-adapter", adapters["sd"], {"main": "6" * 40})
    engine = Engine(settings.model_copy(update={"hf_hub_cache": hub}))

    def on(**fields) -> str:
        request = InferenceRequest.model_validate(BASE | fields)
        return engine.generate(request, lambda _: None, lambda: False).images[0].base64

    assert on(ip_adapter=reference("acme/ip-adapter")) == on(ip_adapter=reference(adapters["sd"]))
    with pytest.raises(ModelSourceError, match=r"^ip_adapter\.weight_name: .* has no models/other\.safetensors"):
        on(ip_adapter=reference(adapters["sd"], weight_name="models/other.safetensors"))
    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(adapters["sd"], no_encoder, ignore=shutil.ignore_patterns("image_encoder"))
    with pytest.raises(ModelSourceError, match=r"^ip_adapter\.image_encoder: .* has no image encoder in "
                                               r"models/image_encoder/"):
        on(ip_adapter=reference(no_encoder))
    with pytest.raises(ModelSourceError, match=r"^ip_adapter\.id: acme/none is not cached on this worker"):
        on(ip_adapter=reference("acme/none"))


@pytest.mark.parametrize("change, expected", [
    ({"weight_name": "../x.safetensors"}, "ip_adapter.weight_name: "),
    ({"weight_name": "models/ip-adapter_sd15.bin"}, "ip_adapter.weight_name: string should match pattern"),
    ({"image_encoder": "models/../../etc"}, "ip_adapter.image_encoder: must stay inside the repo"),
    ({"scale": 3}, "ip_adapter.scale: input should be less than or equal to 2"),
    ({"image": "not an image!"}, "ip_adapter.image: must be base64"),
])
def test_bad_ip_adapter_fields_name_themselves(change, expected):
    spec = {"id": "h94/IP-Adapter", "weight_name": "models/ip-adapter_sd15.safetensors", "image": RED} | change
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(BASE | {"ip_adapter": spec})
    assert describe_validation_error(info.value).startswith(expected)


def test_several_ip_adapters_steer_together(run, adapters, tmp_path_factory, tiny_dir):
    """ip_adapters: each with its image and scale, sharing the first one's image encoder."""
    from tests.helpers import decode

    other = build_ip_adapter(tiny_dir, tmp_path_factory.mktemp("ip") / "other", seed=1)
    one = draw(run, ip_adapter=reference(adapters["sd"]))
    assert draw(run, ip_adapters=[reference(adapters["sd"])]) == one  # a list of one is the same thing
    both = draw(run, ip_adapters=[reference(adapters["sd"]), reference(other, BLUE, scale=0.8)])
    assert both != one
    assert draw(run, ip_adapters=[reference(adapters["sd"]), reference(other, BLUE, scale=0.8)]) == both
    assert draw(run, ip_adapters=[reference(adapters["sd"]), reference(other, RED, scale=0.8)]) != both
    assert draw(run, ip_adapters=[reference(adapters["sd"]), reference(other, BLUE, scale=0)]) == one  # bit for bit
    result, _ = run(**BASE, ip_adapters=[reference(adapters["sd"]), reference(other, BLUE, scale=0.8)],
                    output={"metadata": True})
    assert (f"IP-Adapter: {adapters['sd']}/{WEIGHTS}:1.0; {other}/{WEIGHTS}:0.8"
            in decode(result.images[0].base64).text["parameters"])
    assert draw(run) == draw(run, ip_adapter=reference(adapters["sd"], scale=0))  # plain again after them


def test_several_reference_images_steer_one_adapter_together(run, adapters):
    one = draw(run, ip_adapter=reference(adapters["sd"]))
    both = draw(run, ip_adapter=reference(adapters["sd"]) | {"images": [BLUE]})
    assert both not in (one, draw(run, ip_adapter=reference(adapters["sd"], BLUE)))  # red and blue, together
    assert draw(run, ip_adapter=reference(adapters["sd"]) | {"images": [BLUE]}) == both
    several = draw(run, ip_adapters=[reference(adapters["sd"]) | {"images": [BLUE]},
                                     reference(adapters["sd"], scale=0)])
    assert several == both  # per adapter, beside others
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(BASE | {"ip_adapter": reference(adapters["sd"]) | {"images": ["nope!"]}})
    assert describe_validation_error(info.value).startswith("ip_adapter.images[0]: must be base64")


def test_several_ip_adapters_answer_for_the_one_at_fault(run, engine, adapters, sdxl_dir, sd3_dir):
    from schemas import parse_request
    from worker.errors import answer_for

    xl = {"model": {"id": str(sdxl_dir)}}
    plain = draw(run, **xl)
    with pytest.raises(UserInputError, match=r"^ip_adapters\[1\]: does not fit this model \(an IP-Adapter for"):
        draw(run, **xl, ip_adapters=[reference(adapters["sdxl"]), reference(adapters["sd"])])
    assert draw(run, **xl) == plain  # left plain
    with pytest.raises(UserInputError, match=r"^ip_adapters\[1\]\.image_encoder: the IP-Adapters of a request "
                                             r"share the first one's image encoder \(ip_adapters\[0\]\)"):
        draw(run, ip_adapters=[reference(adapters["sd"]), reference(adapters["sd"], image_encoder="models/x")])
    with pytest.raises(UserInputError, match=r"^ip_adapters: .* is an SD3 model; IP-Adapters here are for SD"):
        draw(run, model={"id": str(sd3_dir)}, ip_adapters=[reference(adapters["sd"])])
    for fields, message in [
        ({"ip_adapter": reference(adapters["sd"]), "ip_adapters": [reference(adapters["sd"])]},
         "ip_adapters: send ip_adapter (one) or ip_adapters (several), not both"),
        ({"ip_adapters": [reference(adapters["sd"])] * 5}, "ip_adapters: list should have at most 4 items"),
        ({"ip_adapters": [reference(adapters["sd"]), reference(adapters["sd"], scale=3)]},
         "ip_adapters[1].scale: input should be less than or equal to 2"),
    ]:
        with pytest.raises(Exception) as info:
            parse_request(BASE | fields, engine.settings.limits)
        answer, _ = answer_for(info.value, [])
        assert answer.startswith(message), answer


def test_an_adapter_for_another_image_encoder_is_refused_before_it_runs(run, adapters, tmp_path):
    """An image encoder whose embeddings the adapter cannot take used to fail halfway through
    the job with an internal error."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    mixed = tmp_path / "mixed"
    shutil.copytree(adapters["sd"], mixed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16,
    )).save_pretrained(mixed / "models" / "small_encoder", safe_serialization=True)
    with pytest.raises(UserInputError, match=r"^ip_adapter: takes image embeddings of 24 values, and the image "
                                             r"encoder gives 16 \(an adapter made for another image encoder\)"):
        draw(run, ip_adapter=reference(mixed, image_encoder="models/small_encoder"))
    assert draw(run, ip_adapter=reference(mixed)) == draw(run, ip_adapter=reference(adapters["sd"]))

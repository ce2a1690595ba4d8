"""The family contract (worker/families/): every family in the registry is recognised from its
files and from its loaded pipeline, draws what diffusers' own pipeline draws, and refuses what it
cannot do by field, naming itself. A new family joins by adding its tiny model to MODELS."""

from __future__ import annotations

import functools
import json
import re

import pytest

from tests.helpers import assert_images_close, decode, png_b64
from worker import families
from worker.errors import UserInputError

# Each family's tiny model: the name of the session fixture that builds it.
MODELS = {"SD 1.x/2.x": "tiny_dir", "SDXL": "sdxl_dir", "SDXL refiner": "refiner_dir", "SD3": "sd3_dir",
          "FLUX.1": "flux_dir", "FLUX.1 Fill": "fill_dir", "FLUX.1 Kontext": "kontext_dir",
          "FLUX.2 [klein]": "klein_dir", "FLUX.2 [dev]": "flux2_dev_dir",
          "Z-Image": "zimage_dir", "Qwen-Image": "qwenimage_dir", "Qwen-Image-Edit": "qwenedit_dir",
          "Qwen-Image-Edit-Plus": "qwenedit_plus_dir"}

# A value for each request field some family refuses (they are refused before anything is fetched).
REFUSED_VALUES = {
    "ip_adapter": {"id": "/adapters", "weight_name": "ip.safetensors", "image": png_b64()},
    "ip_adapters": [{"id": "/adapters", "weight_name": "ip.safetensors", "image": png_b64()}],
    "embeddings": [{"id": "/embedding.safetensors"}],
    "tiling": True,
    "clip_skip": 1,
    "controlnets": [{"id": "/controlnet", "image": png_b64()}],
    "hires": {"scale": 1.5},
    "variation": {"seed": 1, "strength": 0.5},
    "negative_prompt": "fog",
    "true_cfg_scale": 3.0,
}

NAMES = [family.name for family in families.FAMILIES]


def family_and_model(request, name: str):
    family = next(f for f in families.FAMILIES if f.name == name)
    return family, request.getfixturevalue(MODELS[name])


def test_every_family_has_a_tiny_model_here():
    assert set(MODELS) == set(NAMES)


def test_a_family_refuses_the_tasks_it_does_not_run(request, run, tiny_dir):
    """A family's ``tasks`` are what a request's task may ask of it (the SD family, told it
    runs txt2img only, refuses img2img by field)."""
    from schemas import InferenceRequest
    from worker.families.sd import SD

    class Txt2imgOnly(type(SD)):
        tasks = ("txt2img",)

    pipe = _loaded(request, run, tiny_dir).pipeline
    img2img = InferenceRequest.model_validate({"prompt": "p", "image": png_b64()})
    with pytest.raises(UserInputError, match=r"^task: m is an SD 1\.x/2\.x model; it runs txt2img, not img2img"):
        Txt2imgOnly().check(img2img, "m", pipe)
    SD.check(img2img, "m", pipe)  # the family as it is runs it


@pytest.mark.parametrize("name", NAMES)
def test_a_family_is_recognised_from_its_index_and_from_its_pipeline(request, name):
    from diffusers import DiffusionPipeline

    family, model_dir = family_and_model(request, name)
    assert families.at(model_dir) is family
    index = families.read_index(model_dir)
    assert [f for f in families.FAMILIES if f.recognises(families.components(index))] == [family]
    own = family.own_components(model_dir)  # (Qwen-Image-Edit's processor, without torchvision)
    assert families.of_pipeline(DiffusionPipeline.from_pretrained(model_dir, **own)) is family


@pytest.mark.parametrize("name", NAMES)
def test_txt2img_draws_what_diffusers_draws(request, run, name):
    """Same weights, seed, size, steps and guidance: the image diffusers' own pipeline gives."""
    import torch
    from diffusers import AutoPipelineForText2Image

    family, model_dir = family_and_model(request, name)
    fields = dict(prompt="a lighthouse", num_inference_steps=2, guidance_scale=4.0, width=64, height=64)
    if family.true_cfg and not family.distilled_guidance:  # (Qwen-Image: no guidance but true_cfg_scale)
        fields |= {"true_cfg_scale": fields.pop("guidance_scale"), "negative_prompt": "fog"}
    if "txt2img" not in family.tasks:  # (FLUX.1 Fill: its inpainting is held to diffusers' in its own tests)
        with pytest.raises(UserInputError, match=rf"^task: .* is {re.escape(family.kind)}; it runs .*, not txt2img"):
            run(model={"id": str(model_dir)}, seed=1, **fields)
        return
    if family.refines:  # a refiner is never a request's model
        with pytest.raises(UserInputError, match=r"^model: .* is an SDXL refiner"):
            run(model={"id": str(model_dir)}, seed=1, **fields)
        return
    result, _ = run(model={"id": str(model_dir)}, seed=1, **fields)
    pipe = AutoPipelineForText2Image.from_pretrained(model_dir, **family.own_components(model_dir))
    family.attach(pipe, model_dir)  # (FLUX.2 [dev]'s tokenizer, as the worker loads it)
    pipe.set_progress_bar_config(disable=True)
    size = family.txt2img_size(64, 64)  # (FLUX.1 Kontext: else diffusers draws a megapixel)
    expected = pipe(**fields, **size, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert_images_close(expected, decode(result.images[0].base64), f"family-{family.name.replace('/', '-')}")
    assert result.images[0].width == 64


@pytest.mark.parametrize("name", [n for n in NAMES if not n.endswith("refiner")])
def test_a_family_refuses_by_field_naming_itself(request, run, name):
    family, model_dir = family_and_model(request, name)
    model = {"id": str(model_dir)}
    run = functools.partial(run, **_task_inputs(family))
    # Sizes off its multiple (the schema asks for multiples of 8 of every model).
    multiple = family.multiple(_loaded(request, run, model_dir).pipeline)
    if multiple > 8:
        with pytest.raises(UserInputError, match=rf"^width: must be a multiple of {multiple} for {model_dir}, got 72"):
            run(prompt="p", model=model, width=72, height=64)
    # Each field it does not take.
    for field in family.refused:
        assert field in REFUSED_VALUES, f"add a value for {field} to REFUSED_VALUES"
        if not _valid(prompt="p", **_task_inputs(family), **{field: REFUSED_VALUES[field]}):
            continue  # the schema refuses it for this family's task already (hires: txt2img only)
        with pytest.raises(UserInputError, match=rf"^{field}: .* is {re.escape(family.kind)}; "):
            run(prompt="p", model=model, width=64, height=64, **{field: REFUSED_VALUES[field]})
    # A scheduler of the other kind (flow matching, or noise / v-prediction).
    other = "DDIM" if family.flow_matching else "FlowMatchEulerDiscrete"
    with pytest.raises(UserInputError,
                       match=rf"^scheduler: {other} cannot sample this model, .*\({re.escape(family.name)}\)"):
        run(prompt="p", model=model, width=64, height=64, num_inference_steps=2, scheduler=other)


def _task_inputs(family) -> dict:
    """What a request to ``family`` needs besides a prompt: nothing, or for a family without
    txt2img, the image of an edit (Qwen-Image-Edit) or the image and mask of an inpainting
    (FLUX.1 Fill)."""
    if "txt2img" in family.tasks:
        return {}
    if "edit" in family.tasks:
        return {"task": "edit", "image": png_b64()}
    return {"image": png_b64(), "mask_image": png_b64(), "strength": 1.0}


def _valid(**fields) -> bool:
    from pydantic import ValidationError

    from schemas import InferenceRequest

    try:
        InferenceRequest.model_validate(fields)
    except ValidationError:
        return False
    return True


def _loaded(request, run, model_dir):
    """The family's model, loaded on the shared engine."""
    run(prompt="p", model={"id": str(model_dir)}, width=64, height=64, num_inference_steps=2,
        **_task_inputs(families.at(model_dir)))
    engine = request.getfixturevalue("engine")
    return next(loaded for loaded in engine.models.loaded() if loaded.ref.id == str(model_dir))


def test_models_this_worker_cannot_run_are_refused_before_loading(run, tmp_path):
    from worker.errors import ModelSourceError

    other = tmp_path / "cogview"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({
        "_class_name": "CogView4Pipeline", "transformer": ["diffusers", "CogView4Transformer2DModel"],
        "text_encoder": ["transformers", "GlmModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }))  # and no weights at all: they are never read
    with pytest.raises(ModelSourceError) as info:
        run(prompt="p", num_inference_steps=1, model={"id": str(other)})
    assert str(info.value) == (f"model.id: could not load {other}: it is a CogView4Pipeline model; this worker runs "
                               "Stable Diffusion 1.x, 2.x, XL and 3 models, FLUX.1, FLUX.2, Qwen-Image and Z-Image")
    assert run(prompt="p", num_inference_steps=1)[0].images  # and the worker goes on


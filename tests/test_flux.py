"""FLUX.1 (worker/families/flux.py) on a tiny random pipeline: what a request leaves out takes
diffusers' defaults for the model ([dev]: 28 steps, guidance 3.5; [schnell]: 4 steps, T5 reading
256 tokens); ``true_cfg_scale``; seeds in batches; img2img and inpainting; LoRAs for one request;
what it refuses, by field."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from tests.helpers import assert_images_close, decode, png_b64, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


def diffusers_image(model_dir, cls: str = "FluxPipeline", seed: int = 1, **fields):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**fields, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def b64(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def ours(result, i: int = 0):
    return decode(result.images[i].base64)


def test_txt2img_at_flux_defaults_is_diffusers_fluxpipeline_at_its_own(run, flux_dir):
    """No steps, no guidance: FluxPipeline's own 28 steps and guidance 3.5, not SD's 25 and 7.5."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(flux_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 28
    expected = diffusers_image(flux_dir, prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "flux-defaults", tolerance=0)


def test_schnell_takes_its_own_steps_and_sequence_length(run, tmp_path):
    from tests.fixtures.flux import build_flux

    schnell = build_flux(tmp_path / "schnell", schnell=True)
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(schnell)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 4
    expected = diffusers_image(schnell, prompt="a lighthouse", num_inference_steps=4, max_sequence_length=256, **SIZE)
    assert_images_close(expected, ours(result), "flux-schnell", tolerance=0)
    # What the request says wins.
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(schnell)}, num_inference_steps=2, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 2


def test_true_cfg_with_a_negative_prompt_is_diffusers_own(run, flux_dir):
    fields = dict(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=3, guidance_scale=2.0, **SIZE)
    result, _ = run(seed=2, model={"id": str(flux_dir)}, true_cfg_scale=4.0, **fields)
    expected = diffusers_image(flux_dir, seed=2, true_cfg_scale=4.0, **fields)
    assert_images_close(expected, ours(result), "flux-true-cfg", tolerance=0)
    plain, _ = run(seed=2, model={"id": str(flux_dir)}, **fields)
    assert plain.images[0].base64 != result.images[0].base64  # (1: off; diffusers' default)


def test_true_cfg_scale_is_refused_where_guidance_is_real_cfg(run):
    with pytest.raises(UserInputError, match=r"^true_cfg_scale: the embedded model is an SD 1\.x/2\.x model: its "):
        run(prompt="p", true_cfg_scale=3.0, num_inference_steps=1)


def test_each_image_of_a_batch_is_reproduced_alone_by_its_seed(run, flux_dir):
    fields = dict(prompt="a lighthouse", num_inference_steps=2, model={"id": str(flux_dir)}, **SIZE)
    batch, _ = run(seed=10, num_images=3, **fields)
    alone, _ = run(seed=12, **fields)
    assert batch.images[2].seed == 12
    assert_images_close(ours(alone), ours(batch, 2), "flux-batch-seed")


def test_img2img_is_diffusers_fluximg2img_at_the_inputs_size(run, flux_dir):
    image = stripes((96, 64))
    result, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=4, strength=0.6, image=b64(image),
                    model={"id": str(flux_dir)})
    expected = diffusers_image(flux_dir, "FluxImg2ImgPipeline", seed=3, prompt="a lighthouse", num_inference_steps=4,
                               strength=0.6, image=image, width=96, height=64)
    assert_images_close(expected, ours(result), "flux-img2img", tolerance=0)
    # An input off FLUX.1's multiple of 16 gives an answer at its size rounded down.
    result, _ = run(prompt="a lighthouse", num_inference_steps=2, image=b64(stripes((100, 72))),
                    model={"id": str(flux_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)


def test_inpainting_repaints_the_mask_and_keeps_the_rest(run, flux_dir):
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted

    result, _ = run(prompt="a lighthouse", seed=4, num_inference_steps=3, image=b64(image), mask_image=b64(mask),
                    mask_blur=0, model={"id": str(flux_dir)})
    pixels = np.asarray(ours(result).convert("RGB")).astype(int)
    assert (pixels[:, 40:] == (200, 30, 30)).all()  # kept exactly
    assert np.abs(pixels[:, :24] - (200, 30, 30)).max() > 20  # repainted


def diffusers_lora_image(model_dir, lora, scale: float, seed: int):
    """What diffusers draws (3 steps, 64 px) with ``lora`` loaded at ``scale``."""
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[scale])
    return pipe(prompt="a lighthouse", num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                **SIZE).images[0]


def test_a_lora_for_one_request_is_diffusers_own_and_gone_after(run, flux_dir, tmp_path):
    from tests.fixtures.flux import make_flux_lora

    lora = make_flux_lora(flux_dir, tmp_path / "flux-lora.safetensors")
    fields = dict(prompt="a lighthouse", num_inference_steps=3, seed=5, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    styled, _ = run(**fields, loras=[{"id": str(lora), "scale": 0.8}])
    expected = diffusers_lora_image(flux_dir, lora, 0.8, seed=5)
    assert_images_close(expected, ours(styled), "flux-lora", tolerance=1)
    again, _ = run(**fields)
    assert again.images[0].base64 == plain.images[0].base64  # the next request gets the plain model


def test_kontext_edits_at_the_inputs_size_as_diffusers_does_at_that_size(run, kontext_dir):
    """``task: "edit"``: the prompt is the instruction, ``image`` the picture; the answer has the
    input's size rounded down to 16 (or the requested one), never Kontext's own megapixel."""
    image = stripes((96, 64))
    result, _ = run(task="edit", prompt="make it snow", image=b64(image), seed=6, num_inference_steps=3,
                    model={"id": str(kontext_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    expected = diffusers_image(kontext_dir, "FluxKontextPipeline", seed=6, image=image, prompt="make it snow",
                               num_inference_steps=3, width=96, height=64, max_area=96 * 64, _auto_resize=False)
    assert_images_close(expected, ours(result), "kontext-edit", tolerance=0)
    asked, _ = run(task="edit", prompt="make it snow", image=b64(stripes((100, 72))), width=64, height=80,
                   num_inference_steps=2, model={"id": str(kontext_dir)})
    assert (asked.images[0].width, asked.images[0].height) == (64, 80)


def test_edit_is_for_models_made_for_it(run, kontext_dir, flux_dir):
    with pytest.raises(UserInputError, match=r"^task: .* is a FLUX\.1 model; it runs txt2img, img2img, inpaint, "
                                             r"not edit"):
        run(task="edit", prompt="make it snow", image=b64(stripes((64, 64))), num_inference_steps=2,
            model={"id": str(flux_dir)})
    with pytest.raises(UserInputError, match=r"^task: .* is a FLUX\.1 Kontext model; it runs txt2img, edit, "
                                             r"not img2img"):
        run(prompt="p", image=b64(stripes((64, 64))), num_inference_steps=2, model={"id": str(kontext_dir)})


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "a (lighthouse:1.3)"}, "prompt: weights like (word:1.2), [word] and BREAK are read for SD 1.x, 2.x "
                                       "and XL models, not FLUX.1 ones"),
    ({"scheduler": "DDIM"}, "scheduler: DDIM cannot sample this model, a flow-matching model (FLUX.1)"),
    ({"clip_skip": 1}, "clip_skip: {model} is a FLUX.1 model; its prompts are read by T5 as well as CLIP"),
    ({"refiner": {"id": "/refiner"}}, "refiner: {model} is not an SDXL model"),
    ({"width": 72}, "width: must be a multiple of 16 for {model}, got 72"),
])
def test_what_flux_does_not_take_is_refused_by_field(run, flux_dir, fields, message):
    with pytest.raises(UserInputError) as info:
        run(**{"prompt": "p", "num_inference_steps": 1, "model": {"id": str(flux_dir)}, **SIZE, **fields})
    assert str(info.value).startswith(message.format(model=flux_dir)), str(info.value)


def test_a_kontext_edit_through_the_streaming_handler(runner, kontext_dir):
    from tests.helpers import stream

    *progress, result = stream(runner, {"id": "edit-1", "input": {
        "task": "edit", "prompt": "make it snow", "image": b64(stripes((80, 64))), "num_inference_steps": 2,
        "stream": True, "model": {"id": str(kontext_dir)}}})
    assert result.get("type") == "result" and result["task"] == "edit", result
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (80, 64)
    assert [p["step"] for p in progress if p["stage"] == "inference"] == [1, 2]


def test_fill_inpaints_as_diffusers_fluxfillpipeline_at_its_defaults(run, fill_dir):
    """A FLUX.1 Fill model inpaints through FluxFillPipeline at its own defaults (50 steps,
    guidance 30, strength 1) when the request leaves them out."""
    from PIL import Image

    image = stripes((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result, events = run(prompt="a window", seed=7, image=b64(image), mask_image=b64(mask), mask_blur=0,
                         keep_unmasked=False, model={"id": str(fill_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    expected = diffusers_image(fill_dir, "FluxFillPipeline", seed=7, prompt="a window", image=image,
                               mask_image=mask, width=64, height=64)
    assert_images_close(expected, ours(result), "flux-fill", tolerance=0)


def test_fill_outpaints_keeping_the_image_and_painting_the_margins(run, fill_dir):
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    result, _ = run(prompt="a wall", seed=8, image=b64(image), outpaint={"right": 32}, num_inference_steps=3,
                    mask_blur=0, model={"id": str(fill_dir)})
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    pixels = np.asarray(ours(result).convert("RGB")).astype(int)
    assert (pixels[:, :56] == (200, 30, 30)).all()  # the image, kept
    assert np.abs(pixels[:, 72:] - (200, 30, 30)).max() > 20  # the margin, painted


@pytest.mark.parametrize("fields, message", [
    ({}, "task: {model} is a FLUX.1 Fill model; it runs inpaint, not txt2img"),
    ({"image": True}, "task: {model} is a FLUX.1 Fill model; it runs inpaint, not img2img"),
    ({"image": True, "mask_image": True, "negative_prompt": "fog"},
     "negative_prompt: {model} is a FLUX.1 Fill model; FluxFillPipeline takes no negative prompt"),
    ({"image": True, "mask_image": True, "true_cfg_scale": 3.0},
     "true_cfg_scale: {model} is a FLUX.1 Fill model; FluxFillPipeline has no true classifier-free guidance"),
])
def test_what_fill_does_not_take_is_refused_by_field(run, fill_dir, fields, message):
    pictures = {name: b64(stripes((64, 64))) for name in ("image", "mask_image") if fields.pop(name, None)}
    with pytest.raises(UserInputError) as info:
        run(prompt="p", num_inference_steps=2, model={"id": str(fill_dir)}, **pictures, **fields)
    assert str(info.value).startswith(message.format(model=fill_dir)), str(info.value)


def test_forge_payloads_distilled_cfg_scale_is_flux_guidance(runner, flux_dir):
    """A Forge (AUTOMATIC1111) payload for FLUX.1: ``distilled_cfg_scale`` is the embedded
    guidance and ``cfg_scale`` beside it real CFG, in the request and in the infotext."""
    import json

    from schemas import Limits, parse_request
    from tests.helpers import stream

    forge = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 2, "cfg_scale": 3, "distilled_cfg_scale": 2.5,
             "seed": 4, "width": 64, "height": 64, "sampler_name": "Euler", "scheduler": "Simple",
             "override_settings": {"sd_model_checkpoint": str(flux_dir)}}
    request = parse_request(forge, Limits())
    assert (request.guidance_scale, request.true_cfg_scale) == (2.5, 3)
    assert parse_request(forge | {"cfg_scale": 1}, Limits()).true_cfg_scale is None  # 1: off, as Forge's default
    got = stream(runner, {"id": "forge", "input": forge})[-1]
    assert "images" in got, got
    infotext = json.loads(got["info"])["infotexts"][0]
    assert "Sampler: Euler, CFG scale: 3.0, Distilled CFG Scale: 2.5, Seed: 4" in infotext, infotext
    ours = stream(runner, {"id": "ours", "input": {
        "prompt": "a lighthouse", "negative_prompt": "fog", "num_inference_steps": 2, "guidance_scale": 2.5,
        "true_cfg_scale": 3, "seed": 4, "width": 64, "height": 64, "scheduler": "FlowMatchEulerDiscrete",
        "model": {"id": str(flux_dir)}, "output": {"metadata": True}}})[-1]
    assert got["images"][0] == ours["images"][0]["base64"]


@pytest.fixture(scope="module")
def flux_nets(flux_dir, tmp_path_factory):
    from tests.fixtures.flux import build_flux_controlnet

    root = tmp_path_factory.mktemp("flux-controlnets")
    return {"plain": str(build_flux_controlnet(flux_dir, root / "net")),
            "union": str(build_flux_controlnet(flux_dir, root / "union", seed=1, modes=3))}


def diffusers_controlnet_image(model_dir, net, seed: int, **fields):
    import diffusers

    pipe = diffusers.FluxControlNetPipeline.from_pretrained(
        model_dir, controlnet=diffusers.FluxControlNetModel.from_pretrained(net))
    pipe.set_progress_bar_config(disable=True)
    return pipe(**fields, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_a_controlnet_steers_as_diffusers_fluxcontrolnetpipeline_at_its_defaults(run, flux_dir, flux_nets):
    """FluxControlNetPipeline's own defaults (28 steps, guidance 7) where the request leaves them
    out; the answer at the control image's size."""
    control = stripes((64, 64))
    net = {"id": flux_nets["plain"], "image": b64(control)}
    result, events = run(prompt="a lighthouse", seed=3, controlnets=[net], model={"id": str(flux_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 28
    expected = diffusers_controlnet_image(flux_dir, flux_nets["plain"], 3, prompt="a lighthouse", control_image=control,
                                          width=64, height=64)
    assert_images_close(expected, ours(result), "flux-controlnet", tolerance=0)
    plain, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=28, guidance_scale=7.0,
                   model={"id": str(flux_dir)}, **SIZE)
    assert plain.images[0].base64 != result.images[0].base64


def test_a_union_controlnet_is_told_its_mode(run, flux_dir, flux_nets):
    control = stripes((64, 64))
    fields = dict(prompt="a lighthouse", seed=4, num_inference_steps=3, model={"id": str(flux_dir)})
    depth, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": b64(control), "mode": 2}])
    expected = diffusers_controlnet_image(flux_dir, flux_nets["union"], 4, prompt="a lighthouse", control_image=control,
                                          control_mode=2, num_inference_steps=3, width=64, height=64)
    assert_images_close(expected, ours(depth), "flux-union", tolerance=0)
    canny, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": b64(control), "mode": 0}])
    assert canny.images[0].base64 != depth.images[0].base64
    # Two at once (FluxMultiControlNetModel), a Union one among them.
    both, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": b64(control), "mode": 2},
                                         {"id": flux_nets["plain"], "image": b64(control), "scale": 0.5}])
    assert both.images[0].base64 not in (depth.images[0].base64, canny.images[0].base64)


def test_img2img_and_inpainting_take_controlnets_too(run, flux_dir, flux_nets):
    image = stripes((64, 64))
    fields = dict(prompt="a lighthouse", seed=5, num_inference_steps=4, image=b64(image), model={"id": str(flux_dir)})
    net = [{"id": flux_nets["plain"], "image": b64(image.rotate(90))}]
    for task in ({}, {"mask_image": png_b64((255, 255, 255))}):
        plain, _ = run(**fields, **task)
        steered, _ = run(**fields, **task, controlnets=net)
        assert steered.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("net, mode, message", [
    ("union", None, "controlnets[0].mode: {net} is a Union ControlNet: say which kind of control image this is "
                    "(0 to 2, as its model card numbers them)"),
    ("union", 3, "controlnets[0].mode: {net} has modes 0 to 2, got 3"),
    ("plain", 1, "controlnets[0].mode: {net} is not a Union ControlNet: it takes no mode"),
])
def test_a_union_controlnets_mode_is_checked_by_field(run, flux_dir, flux_nets, net, mode, message):
    spec = {"id": flux_nets[net], "image": png_b64()} | ({} if mode is None else {"mode": mode})
    with pytest.raises(UserInputError) as info:
        run(prompt="p", num_inference_steps=1, controlnets=[spec], model={"id": str(flux_dir)})
    assert str(info.value) == message.format(net=flux_nets[net])


def test_controlnets_of_other_families_are_refused_on_flux(run, flux_dir, flux_nets, tiny_dir, tmp_path):
    from tests.fixtures.controlnets import build_controlnet

    sd_net = str(build_controlnet(tiny_dir, tmp_path / "sd-net"))
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* is a ControlNet for SD 1\.x, 2\.x or XL models"):
        run(prompt="p", num_inference_steps=1, controlnets=[{"id": sd_net, "image": png_b64()}],
            model={"id": str(flux_dir)})
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* is a ControlNet for FLUX\.1 models"):
        run(prompt="p", num_inference_steps=1, controlnets=[{"id": flux_nets["plain"], "image": png_b64()}])


def test_what_fluxs_controlnet_img2img_pipeline_lacks_is_refused_by_field(run, flux_dir, flux_nets):
    image = b64(stripes((64, 64)))
    net = {"id": flux_nets["plain"], "image": image}
    for field, value in (("negative_prompt", "fog"), ("true_cfg_scale", 2.0)):
        with pytest.raises(UserInputError, match=rf"^{field}: diffusers' FluxControlNetImg2ImgPipeline, which runs "
                                                 "this request, takes none"):
            run(prompt="p", num_inference_steps=2, image=image, controlnets=[net], model={"id": str(flux_dir)},
                **{field: value})


def test_lora_training_on_flux_publishes_a_lora_a_later_request_uses(settings, s3, flux_dir):
    """train_dreambooth_lora_flux.py's recipe (flow matching on packed latents, [dev]'s guidance
    embedding, prompts encoded once), with prior preservation and mirrored images: a LoRA of
    both streams' attention and feed-forwards, which changes the image of a later request."""
    from tests.helpers import train_then_use

    result, keys, plain, tuned = train_then_use(settings, s3, flux_dir, "lora", "flux/trained-lora",
                                                max_train_steps=3, random_flip=True)
    assert result["train"]["steps"] == 3 and result["train"]["loss"] > 0
    assert {key.split(".")[0] for key in keys} == {"transformer"}
    for layer in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.2"):
        assert any(f".{layer}.lora_A." in key for key in keys), layer
    assert any(key.startswith("transformer.single_transformer_blocks.") for key in keys)
    assert tuned.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"method": "dreambooth"}, "train.method: FLUX.1 models train LoRAs here"),
    ({"train_text_encoder": True}, "train.train_text_encoder: FLUX.1 models train their transformer only here"),
    ({"snr_gamma": 5.0}, "train.snr_gamma: Min-SNR weighting is for diffusion models"),
    ({"resolution": 72}, "train.resolution: must be a multiple of 16 for FLUX.1 models, got 72"),
])
def test_what_flux_training_does_not_do_is_refused_by_field(settings, s3, flux_dir, fields, message):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, flux_dir, **fields).startswith(message)


@pytest.mark.gpu
def test_flux_lora_training_in_mixed_precision_keeps_fp32_lora_weights(settings, s3, flux_dir, monkeypatch):
    """The GPU recipe (bf16 autocast, frozen weights in bf16, LoRA weights in fp32, gradient
    checkpointing), run by the CPU's autocast here; on a GPU machine on CUDA."""
    import worker.train.loop
    from tests.helpers import train_then_use

    monkeypatch.setattr(worker.train.loop, "autocast_dtype", lambda device: torch.bfloat16)
    seen = {}
    prepare = worker.train.loop.prepare

    def spy(pipe, family, spec, autocast_dtype):
        params = prepare(pipe, family, spec, autocast_dtype)
        seen.update(trained={p.dtype for p in params}, frozen=pipe.transformer.x_embedder.weight.dtype,
                    checkpointing=pipe.transformer.is_gradient_checkpointing)
        return params

    monkeypatch.setattr(worker.train.loop, "prepare", spy)
    result, _, plain, tuned = train_then_use(settings, s3, flux_dir, "lora", "flux/mixed-lora")
    assert seen == {"trained": {torch.float32}, "frozen": torch.bfloat16, "checkpointing": True}
    assert tuned.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_kohya_and_xlabs_loras_load_as_diffusers_loads_them(run, flux_dir, tmp_path, layout):
    """LoRAs as sd-scripts / ai-toolkit and XLabs save them (Black Forest Labs' key names, q, k
    and v fused) are read by diffusers' FLUX loader: the image is the one diffusers draws."""

    from tests.fixtures.flux import make_flux_lora_other_layout

    lora = make_flux_lora_other_layout(tmp_path / f"{layout}.safetensors", layout)
    fields = dict(prompt="a lighthouse", num_inference_steps=3, seed=6, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    styled, _ = run(**fields, loras=[{"id": str(lora), "scale": 0.7}])
    expected = diffusers_lora_image(flux_dir, lora, 0.7, seed=6)
    assert_images_close(expected, ours(styled), f"flux-{layout}-lora", tolerance=1)
    assert styled.images[0].base64 != plain.images[0].base64
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64


def test_flux_converts_to_an_archive_and_serves_from_it(settings, s3, flux_dir):
    """task convert publishes a FLUX.1 model as a safetensors archive; a fresh worker with an
    empty cache serves the same image from it."""
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, flux_dir, "flux/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


@pytest.mark.parametrize("cache", [{"method": "first_block", "threshold": 0.5}, {"method": "taylorseer", "interval": 2},
                                   {"method": "magcache", "threshold": 0.5}, {"method": "faster"}])
def test_step_caching_is_on_for_its_job_only(run, flux_dir, cache):
    """``cache``: diffusers' cache hooks on the transformer for this job (the image changes a
    little); the next job without it is the uncached image bit for bit."""
    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=8, model={"id": str(flux_dir)}, **SIZE)
    plain, _ = run(**fields)
    cached, _ = run(**fields, cache=cache)
    assert cached.images[0].base64 != plain.images[0].base64
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64


def test_step_caching_is_refused_where_the_denoiser_has_no_cache_hooks(run):
    with pytest.raises(UserInputError, match=r"^cache: the embedded model is an SD 1\.x/2\.x model: its "
                                             r"UNet2DConditionModel has no diffusers cache hooks"):
        run(prompt="p", num_inference_steps=2, cache={"method": "first_block"})


def test_a_cache_option_of_another_method_is_refused_by_field():
    from pydantic import ValidationError

    from schemas import InferenceRequest

    with pytest.raises(ValidationError, match=r"threshold: for first_block and magcache, not taylorseer"):
        InferenceRequest.model_validate({"prompt": "p", "cache": {"method": "taylorseer", "threshold": 0.1}})

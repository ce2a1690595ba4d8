"""Qwen-Image (worker/families/qwenimage.py) on tiny random pipelines built offline (a
Qwen2.5-VL text encoder with its vision tower, a byte-level Qwen tokenizer, Qwen-Image's own
VAE): txt2img at diffusers' defaults, true CFG, img2img and inpainting, a LoRA for one request;
Qwen-Image-Edit's edits of one image and Edit-Plus's of several, each as diffusers' own pipeline
draws them; archives; and what each refuses, by field."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.qwenimage import load
from tests.helpers import BUCKET, assert_images_close, decode, diffusers_images, image_b64, ours, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


def test_txt2img_at_its_defaults_is_diffusers_qwenimagepipeline_at_its_own(run, qwenimage_dir):
    """No steps, no guidance: QwenImagePipeline's own 50 steps, and its true_cfg_scale 4, which
    acts with a negative prompt only."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(qwenimage_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    [expected] = diffusers_images(load(qwenimage_dir), prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "qwenimage-defaults", tolerance=0)


def test_true_cfg_with_a_negative_prompt_in_a_batch_is_diffusers_own(run, qwenimage_dir):
    """Real CFG (the default scale, then another), two images of a batch each its seed's, and
    the answer's metadata names the CFG that ran."""
    pipe = load(qwenimage_dir)
    fields = dict(prompt="a lighthouse", negative_prompt=" ", num_inference_steps=3, **SIZE)
    result, _ = run(seed=2, num_images=2, model={"id": str(qwenimage_dir)}, output={"metadata": True}, **fields)
    expected = diffusers_images(pipe, seed=2, count=2, **fields)
    for i in range(2):
        assert_images_close(expected[i], ours(result, i), f"qwenimage-cfg-{i}", tolerance=0)
    assert "CFG scale: 4.0," in ours(result).info["parameters"]
    stronger, _ = run(seed=2, true_cfg_scale=7.0, model={"id": str(qwenimage_dir)}, **fields)
    [expected] = diffusers_images(pipe, seed=2, true_cfg_scale=7.0, **fields)
    assert_images_close(expected, ours(stronger), "qwenimage-cfg-7", tolerance=0)
    assert stronger.images[0].base64 != result.images[0].base64


def test_img2img_is_diffusers_qwenimageimg2img_at_the_inputs_size(run, qwenimage_dir):
    image = stripes((96, 64))
    result, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=4, image=image_b64(image),
                    model={"id": str(qwenimage_dir)})
    [expected] = diffusers_images(load(qwenimage_dir, "img2img"), seed=3, prompt="a lighthouse",
                                  num_inference_steps=4, image=image, width=96, height=64)  # (strength: its 0.6)
    assert_images_close(expected, ours(result), "qwenimage-img2img", tolerance=0)
    assert (result.images[0].width, result.images[0].height) == (96, 64)


def test_inpainting_is_diffusers_qwenimageinpaint_and_keeps_the_rest(run, qwenimage_dir):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted
    fields = dict(prompt="a lighthouse", num_inference_steps=3, strength=1.0)
    raw, _ = run(seed=4, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0, keep_unmasked=False,
                 model={"id": str(qwenimage_dir)}, **fields)
    [expected] = diffusers_images(load(qwenimage_dir, "inpaint"), seed=4, image=image, mask_image=mask, **SIZE,
                                  **fields)
    assert_images_close(expected, ours(raw), "qwenimage-inpaint", tolerance=0)
    kept, _ = run(seed=4, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0,
                  model={"id": str(qwenimage_dir)}, **fields)
    pixels = np.asarray(ours(kept).convert("RGB")).astype(int)
    assert (pixels[:, 40:] == (200, 30, 30)).all()  # kept exactly
    assert np.abs(pixels[:, :24] - (200, 30, 30)).max() > 20  # repainted


def test_a_lora_for_one_request_is_diffusers_own_and_gone_after(run, qwenimage_dir, tmp_path):
    from tests.fixtures.lora_files import make_transformer_lora

    lora = make_transformer_lora(qwenimage_dir, tmp_path / "qwen-lora.safetensors", "QwenImagePipeline")
    fields = dict(prompt="a lighthouse", num_inference_steps=3, **SIZE)
    plain, _ = run(seed=5, model={"id": str(qwenimage_dir)}, **fields)
    styled, _ = run(seed=5, model={"id": str(qwenimage_dir)}, loras=[{"id": str(lora), "scale": 0.8}], **fields)
    pipe = load(qwenimage_dir)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    [expected] = diffusers_images(pipe, seed=5, **fields)
    assert_images_close(expected, ours(styled), "qwenimage-lora", tolerance=1)
    assert styled.images[0].base64 != plain.images[0].base64
    assert run(seed=5, model={"id": str(qwenimage_dir)}, **fields)[0].images[0].base64 == plain.images[0].base64


def test_an_edit_is_diffusers_qwenimageedit_at_the_inputs_size_or_the_asked_one(run, qwenedit_dir):
    """The image goes in as sent (the pipeline sizes it for its VAE and vision tower); the answer
    has the input's size rounded down to 16, or the size asked."""
    image = stripes((100, 72))
    fields = dict(prompt="make it blue", num_inference_steps=2)
    result, _ = run(task="edit", image=image_b64(image), seed=6, model={"id": str(qwenedit_dir)}, **fields)
    pipe = load(qwenedit_dir, "edit")
    [expected] = diffusers_images(pipe, seed=6, image=image, width=96, height=64, **fields)
    assert_images_close(expected, ours(result), "qwenedit", tolerance=0)
    asked, _ = run(task="edit", image=image_b64(image), seed=6, width=64, height=80, negative_prompt=" ",
                   model={"id": str(qwenedit_dir)}, **fields)
    [expected] = diffusers_images(pipe, seed=6, image=image, width=64, height=80, negative_prompt=" ", **fields)
    assert_images_close(expected, ours(asked), "qwenedit-asked", tolerance=0)


def test_edit_plus_takes_several_images_as_diffusers_does(run, qwenedit_dir, qwenedit_plus_dir):
    first, second = stripes((64, 64)), Image.new("RGB", (48, 80), (20, 40, 220))
    fields = dict(prompt="the coat of Picture 1 in the colour of Picture 2", num_inference_steps=2, **SIZE)
    result, _ = run(task="edit", images=[image_b64(first), image_b64(second)], seed=7,
                    model={"id": str(qwenedit_plus_dir)}, **fields)
    [expected] = diffusers_images(load(qwenedit_plus_dir, "edit-plus"), seed=7, image=[first, second], **fields)
    assert_images_close(expected, ours(result), "qwenedit-plus", tolerance=0)
    one, _ = run(task="edit", image=image_b64(first), seed=7, model={"id": str(qwenedit_plus_dir)}, **fields)
    assert one.images[0].base64 != result.images[0].base64  # the second image counted
    with pytest.raises(UserInputError, match=r"^images: .* is a Qwen-Image-Edit-Plus model; its edits take up to 3, "
                                             r"got 4$"):
        run(task="edit", images=[image_b64(first)] * 4, model={"id": str(qwenedit_plus_dir)}, **fields)
    with pytest.raises(UserInputError, match=r"^images: .* is a Qwen-Image-Edit model; its edits take one image, "
                                             r"got 2$"):
        run(task="edit", images=[image_b64(first)] * 2, model={"id": str(qwenedit_dir)}, **fields)


@pytest.mark.parametrize("fields, message", [
    ({"guidance_scale": 4.0}, r"^guidance_scale: .* is a Qwen-Image model: its transformer has no guidance embedding; "
                              r"its guidance is true_cfg_scale, with a negative_prompt$"),
    ({"clip_skip": 2}, r"^clip_skip: .* is a Qwen-Image model; its prompts are read by Qwen2.5-VL"),
    ({"controlnets": [{"id": "/x", "image": "x"}]}, r"^controlnets: .* is a Qwen-Image model; ControlNets for Qwen"),
    ({"true_cfg_scale": 5.0}, r"^true_cfg_scale: acts only with a negative_prompt, as diffusers runs it"),
    ({"width": 72}, r"^width: must be a multiple of 16 for "),
    ({"num_inference_steps": 1}, r"^num_inference_steps: at least 2 for .*'s scheduler, which ends its steps at "
                                 r"shift_terminal 0.02$"),
    ({"task": "edit", "image": "x"}, r"^task: .* is a Qwen-Image model; it runs txt2img, img2img, inpaint, not edit"),
    ({"prompt": "a (lighthouse:1.3)"}, r"^prompt: weights like \(word:1.2\), \[word\] and BREAK are read for SD 1.x, "
                                       r"2.x and XL models, not Qwen-Image ones"),
])
def test_what_it_cannot_do_is_refused_by_field(run, qwenimage_dir, fields, message, tmp_path):
    if fields.get("image") == "x":
        fields["image"] = image_b64(stripes((64, 64)))
    with pytest.raises(UserInputError, match=message):
        run(**({"prompt": "p", "num_inference_steps": 2, "model": {"id": str(qwenimage_dir)}} | fields))


def test_an_edit_model_runs_edits_only(run, qwenedit_dir):
    with pytest.raises(UserInputError, match=r"^task: .* is a Qwen-Image-Edit model; it runs edit, not img2img$"):
        run(prompt="p", image=image_b64(stripes((64, 64))), model={"id": str(qwenedit_dir)})


def test_it_converts_to_an_archive_and_serves_from_it(settings, s3, qwenimage_dir):
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, qwenimage_dir, "qwenimage/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


def test_an_edit_model_converts_with_its_processor_and_edits_from_the_archive(settings, s3, qwenedit_plus_dir):
    """The archive holds the processor in transformers' layout (named as Qwen2VLProcessor, as the
    model's own): a fresh worker with an empty cache edits with it as the source model does."""
    from schemas import ConvertRequest, InferenceRequest
    from worker.engine import Engine

    dest = f"s3://{BUCKET}/qwenimage/edit-plus.tar.zst"
    convert = {"task": "convert", "model": {"id": str(qwenedit_plus_dir)},
               "convert": {"dest_url": dest, "precision": "fp32"}}
    Engine(settings).convert(ConvertRequest.model_validate(convert), lambda event: None, lambda: False)
    edit = {"task": "edit", "prompt": "p", "images": [image_b64(stripes((64, 64)))] * 2, "num_inference_steps": 2,
            "seed": 8}
    source = InferenceRequest.model_validate(edit | {"model": {"id": str(qwenedit_plus_dir)}})
    direct = Engine(settings).generate(source, lambda event: None, lambda: False)
    fresh = settings.model_copy(update={"models_dir": settings.models_dir / "fresh-qwen"})
    served = Engine(fresh).generate(InferenceRequest.model_validate(edit | {"model": {"url": dest}}),
                                    lambda event: None, lambda: False)
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64
    index = next((fresh.models_dir).rglob("model_index.json")).read_text()
    assert '"Qwen2VLProcessor"' in index


@pytest.mark.parametrize("cache,negative,passes", [({"method": "first_block", "threshold": 0.5}, " ", 16),
                                                   ({"method": "taylorseer"}, " ", 16),
                                                   ({"method": "faster"}, None, 8)])
def test_its_step_caches_approximate_passes_and_leave_the_next_job_as_it_was(run, qwenimage_dir, cache, negative,
                                                                             passes):
    """Qwen-Image's transformer takes diffusers' cache hooks: passes approximated (under true CFG,
    two a step), and the plain job after is the plain image bit for bit."""
    fields = dict(prompt="a lighthouse", negative_prompt=negative, num_inference_steps=8, seed=9,
                  model={"id": str(qwenimage_dir)}, **SIZE)
    plain, _ = run(**fields)
    cached, _ = run(**fields, cache=cache)
    assert cached.cache.method == cache["method"] and cached.cache.passes == passes
    assert 0 < cached.cache.approximated < passes and cached.images[0].base64 != plain.images[0].base64
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64


def test_faster_cache_is_refused_under_true_cfg_and_an_endpoint_default_passes_it_by(run, settings, qwenimage_dir):
    """FasterCache keeps one state for both of true CFG's passes (it would mix them): asked for,
    it is refused, naming the field; as the endpoint's CACHE, it applies to the jobs it can serve
    (no negative prompt) and leaves true-CFG jobs uncached, as they would be without it."""
    from schemas import CacheSpec, InferenceRequest
    from worker.engine import Engine

    fields = dict(prompt="p", num_inference_steps=2, seed=1, model={"id": str(qwenimage_dir)}, **SIZE)
    with pytest.raises(UserInputError, match=r"^cache.method: faster keeps one state .* Qwen-Image runs apart"):
        run(**fields, negative_prompt=" ", cache={"method": "faster"})
    plain, _ = run(**fields, negative_prompt=" ")
    endpoint = Engine(settings.model_copy(update={"cache": CacheSpec(method="faster")}))
    draw = lambda **more: endpoint.generate(InferenceRequest.model_validate(fields | more),  # noqa: E731
                                            lambda _: None, lambda: False)
    true_cfg = draw(negative_prompt=" ")
    assert true_cfg.cache is None and true_cfg.images[0].base64 == plain.images[0].base64
    assert draw().cache.method == "faster"


def test_magcache_is_refused_without_a_calibration(run, qwenimage_dir):
    with pytest.raises(UserInputError, match=r"^cache.method: diffusers has no MagCache calibration for Qwen-Image"):
        run(prompt="p", num_inference_steps=2, cache={"method": "magcache"}, model={"id": str(qwenimage_dir)})


def test_an_automatic1111_payload_s_cfg_scale_is_its_true_cfg(engine, run, qwenimage_dir):
    """AUTOMATIC1111's ``cfg_scale`` on Qwen-Image is its true CFG, against an empty negative
    prompt where none is sent (as Forge reads it): the image is the native request's with
    ``true_cfg_scale``, and the infotext says the scale."""
    from schemas import parse_request

    payload = {"prompt": "a lighthouse", "steps": 2, "cfg_scale": 3, "seed": 6, "width": 64, "height": 64,
               "override_settings": {"sd_model_checkpoint": str(qwenimage_dir)}}
    request = parse_request(payload, engine.settings.limits)
    served = engine.generate(request, lambda _: None, lambda: False)
    native, _ = run(prompt="a lighthouse", negative_prompt="", true_cfg_scale=3, num_inference_steps=2, seed=6,
                    model={"id": str(qwenimage_dir)}, **SIZE)
    unguided, _ = run(prompt="a lighthouse", num_inference_steps=2, seed=6, model={"id": str(qwenimage_dir)}, **SIZE)
    pixels = [np.asarray(decode(result.images[0].base64)) for result in (served, native, unguided)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    assert "CFG scale: 3.0," in decode(served.images[0].base64).info["parameters"]


def test_lora_training_publishes_a_lora_a_later_request_uses(settings, s3, qwenimage_dir):
    """train_dreambooth_lora_qwen_image.py's recipe (flow matching on packed latents of its video
    VAE's one frame, normalised by its per-channel statistics; the instance and class prompts,
    of different lengths, padded under a mask), with prior preservation and mirrored images: a
    LoRA of the attention, in diffusers' Qwen-Image layout, which changes a later image."""
    from tests.helpers import train_then_use

    result, keys, plain, tuned = train_then_use(settings, s3, qwenimage_dir, "lora", "qwenimage/trained-lora",
                                                max_train_steps=2, random_flip=True, train_batch_size=2)
    assert result["train"]["steps"] == 2 and result["train"]["loss"] > 0
    assert {key.split(".")[0] for key in keys} == {"transformer"}
    for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"):
        assert any(f".{layer}.lora_A." in key for key in keys), layer
    assert tuned.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"method": "dreambooth"}, "train.method: Qwen-Image models train LoRAs here"),
    ({"train_text_encoder": True}, "train.train_text_encoder: Qwen-Image models train their transformer only here"),
    ({"resolution": 72}, "train.resolution: must be a multiple of 16 for Qwen-Image models, got 72"),
])
def test_what_its_training_does_not_do_is_refused_by_field(settings, s3, qwenimage_dir, fields, message):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, qwenimage_dir, **fields).startswith(message)


def test_an_edit_model_is_not_trained_here(settings, s3, qwenedit_dir):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, qwenedit_dir) == (
        "model.id: training supports SD 1.x/2.x, SDXL, SD3, FLUX.1, Z-Image and Qwen-Image models, not "
        "QwenImageEditPipeline")


def test_a_transformer_file_converts_exactly_with_the_configs_of_its_model(settings, http, qwenedit_dir, tmp_path):
    """A Qwen-Image transformer as one file (diffusers' names, as ComfyUI's qwen_image files keep
    them), here an Edit model's: told from its keys (Qwen-Image's configs where model.id is
    absent), read by the transformer's own single-file loader with model.id's configs, text
    encoder, VAE and processor, it edits as the source model does."""
    from safetensors.torch import load_file, save_file

    from schemas import InferenceRequest
    from worker.engine import Engine
    from worker.sources.checkpoints import checkpoint_keys, missing_parts, reference_model

    one_file = tmp_path / "qwen_image_edit_bf16.safetensors"
    save_file(load_file(qwenedit_dir / "transformer" / "diffusion_pytorch_model.safetensors"), one_file)
    assert reference_model(one_file, "model.checkpoint_url") == "Qwen/Qwen-Image"
    assert missing_parts(one_file) == ["text_encoder", "vae"] and "txt_norm.weight" in checkpoint_keys(one_file)
    http.files["/qwen_image_edit_bf16.safetensors"] = one_file.read_bytes()
    small = settings.model_copy(update={"max_loaded_models": 1})
    model = {"id": str(qwenedit_dir)}

    def edit(model: dict):
        request = InferenceRequest.model_validate({"task": "edit", "prompt": "p", "image": image_b64(stripes((64, 64))),
                                                   "num_inference_steps": 2, "seed": 3, "model": model})
        return Engine(small).generate(request, lambda event: None, lambda: False)

    converted = edit(model | {"checkpoint_url": http.url + "/qwen_image_edit_bf16.safetensors"})
    assert converted.model.source == "checkpoint"
    assert converted.images[0].base64 == edit(model).images[0].base64

"""FLUX.2 [klein] (worker/families/flux2.py) on tiny random pipelines built offline (a 27-layer
Qwen3 text encoder read at diffusers' own layers, a byte-level Qwen tokenizer, FLUX.2's VAE with
its latent batch norm), base and step-distilled: txt2img at diffusers' defaults, negative
prompts, edits of one image and of several, inpainting, a LoRA for one request, the step cache
its transformer takes, archives; each as diffusers' own pipeline draws it, and what it refuses,
by field."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.flux2 import load
from tests.helpers import assert_images_close, diffusers_images, image_b64, ours, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


def test_txt2img_at_its_defaults_is_diffusers_flux2kleinpipeline_at_its_own(run, klein_dir):
    """No steps, no guidance: Flux2KleinPipeline's own 50 steps and guidance 4 (real CFG on a
    base model, against its empty prompt)."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(klein_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    [expected] = diffusers_images(load(klein_dir), prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "klein-defaults", tolerance=0)


def test_a_negative_prompt_in_a_batch_is_diffusers_own_with_its_embeddings(run, klein_dir):
    """The pipeline takes a negative prompt only as embeddings: the worker encodes it as the
    pipeline encodes its own; two images of a batch, each its seed's."""
    pipe = load(klein_dir)
    fields = dict(prompt="a lighthouse", num_inference_steps=3, guidance_scale=5.0, **SIZE)
    result, _ = run(seed=2, num_images=2, negative_prompt="fog", model={"id": str(klein_dir)}, **fields)
    negative, _ = pipe.encode_prompt("fog")
    expected = diffusers_images(pipe, seed=2, count=2, negative_prompt_embeds=negative, **fields)
    for i in range(2):
        assert_images_close(expected[i], ours(result, i), f"klein-negative-{i}", tolerance=1)  # (batched: ±1)
    plain, _ = run(seed=2, model={"id": str(klein_dir)}, **fields)
    assert plain.images[0].base64 != result.images[0].base64


def test_a_distilled_model_runs_unguided_and_refuses_guidance(run, klein_distilled_dir):
    """A step-distilled [klein] (as the 4B and 9B ship): its few steps as diffusers runs them;
    guidance above 1 and negative prompts, which would do nothing, refused by field."""
    fields = dict(prompt="a lighthouse", num_inference_steps=4, **SIZE)
    result, _ = run(seed=3, model={"id": str(klein_distilled_dir)}, **fields)
    [expected] = diffusers_images(load(klein_distilled_dir), seed=3, **fields)
    assert_images_close(expected, ours(result), "klein-distilled", tolerance=0)
    assert run(seed=3, guidance_scale=1.0, model={"id": str(klein_distilled_dir)}, **fields)[0].images[0].base64 == \
        result.images[0].base64
    for field, value in (("guidance_scale", 4.0), ("negative_prompt", "fog")):
        with pytest.raises(UserInputError, match=rf"^{field}: .* is a step-distilled FLUX.2 \[klein\] model: it runs "
                                                 "no classifier-free guidance"):
            run(model={"id": str(klein_distilled_dir)}, **fields, **{field: value})


def test_an_edit_is_diffusers_own_at_the_inputs_size_or_the_asked_one(run, klein_distilled_dir):
    """The image goes in as sent (the pipeline fits references to its VAE itself); the answer
    has the input's size rounded down to 16, or the size asked."""
    image = stripes((100, 72))
    fields = dict(prompt="make it blue", num_inference_steps=2)
    pipe = load(klein_distilled_dir)
    result, _ = run(task="edit", image=image_b64(image), seed=4, model={"id": str(klein_distilled_dir)}, **fields)
    [expected] = diffusers_images(pipe, seed=4, image=[image], width=96, height=64, **fields)
    assert_images_close(expected, ours(result), "klein-edit", tolerance=0)
    asked, _ = run(task="edit", image=image_b64(image), seed=4, width=64, height=80,
                   model={"id": str(klein_distilled_dir)}, **fields)
    [expected] = diffusers_images(pipe, seed=4, image=[image], width=64, height=80, **fields)
    assert_images_close(expected, ours(asked), "klein-edit-asked", tolerance=0)
    assert (asked.images[0].width, asked.images[0].height) == (64, 80)


def test_an_edit_of_several_images_is_diffusers_own_up_to_four(run, klein_distilled_dir):
    first, second = stripes((64, 64)), Image.new("RGB", (64, 96), (20, 40, 220))
    fields = dict(prompt="the coat of image 1 in the colour of image 2", num_inference_steps=2, **SIZE)
    result, _ = run(task="edit", images=[image_b64(first), image_b64(second)], seed=5,
                    model={"id": str(klein_distilled_dir)}, **fields)
    [expected] = diffusers_images(load(klein_distilled_dir), seed=5, image=[first, second], **fields)
    assert_images_close(expected, ours(result), "klein-edit-several", tolerance=0)
    one, _ = run(task="edit", image=image_b64(first), seed=5, model={"id": str(klein_distilled_dir)}, **fields)
    assert one.images[0].base64 != result.images[0].base64  # the second image counted
    with pytest.raises(UserInputError, match=r"^images: .* is a FLUX.2 \[klein\] model; its edits take up to 4, "
                                             r"got 5$"):
        run(task="edit", images=[image_b64(first)] * 5, model={"id": str(klein_distilled_dir)}, **fields)
    with pytest.raises(UserInputError, match=r"^images\[1\]: FLUX.2 \[klein\]'s edit pipeline refuses it: Image "
                                             r"too small: 48×80. Both dimensions must be at least 64px$"):
        run(task="edit", images=[image_b64(first), image_b64(Image.new("RGB", (48, 80)))],
            model={"id": str(klein_distilled_dir)}, **fields)


def test_inpainting_is_diffusers_flux2kleininpaint_at_its_defaults_and_keeps_the_rest(run, klein_dir):
    """Its inpainting pipeline's own strength 0.8 and guidance 8 where the request leaves them out."""
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted
    fields = dict(prompt="a lighthouse", num_inference_steps=4)
    raw, _ = run(seed=6, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0, keep_unmasked=False,
                 model={"id": str(klein_dir)}, **fields)
    [expected] = diffusers_images(load(klein_dir, "inpaint"), seed=6, image=image, mask_image=mask, **SIZE, **fields)
    assert_images_close(expected, ours(raw), "klein-inpaint", tolerance=0)
    kept, _ = run(seed=6, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0, strength=1.0,
                  model={"id": str(klein_dir)}, **fields)
    pixels = np.asarray(ours(kept).convert("RGB")).astype(int)
    assert (pixels[:, 40:] == (200, 30, 30)).all()  # kept exactly
    assert np.abs(pixels[:, :24] - (200, 30, 30)).max() > 20  # repainted


@pytest.mark.parametrize("model_fixture, kind, pipeline", [("klein_distilled_dir", "txt2img", "Flux2KleinPipeline"),
                                                          ("flux2_dev_dir", "dev", "Flux2Pipeline")])
def test_a_lora_for_one_request_is_diffusers_own_and_gone_after(request, run, tmp_path, model_fixture, kind, pipeline):
    """[klein] and [dev] alike: diffusers' FLUX.2 loader, the image diffusers draws with it, the
    plain image again after."""
    from tests.fixtures.lora_files import make_transformer_lora

    model_dir = request.getfixturevalue(model_fixture)
    lora = make_transformer_lora(model_dir, tmp_path / "lora.safetensors", pipeline)
    fields = dict(prompt="a lighthouse", num_inference_steps=3, model={"id": str(model_dir)}, **SIZE)
    plain, _ = run(seed=7, **fields)
    styled, _ = run(seed=7, loras=[{"id": str(lora), "scale": 0.8}], **fields)
    pipe = load(model_dir, kind)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    [expected] = diffusers_images(pipe, seed=7, prompt="a lighthouse", num_inference_steps=3, **SIZE)
    assert_images_close(expected, ours(styled), f"{kind}-lora", tolerance=1)
    assert styled.images[0].base64 != plain.images[0].base64
    assert run(seed=7, **fields)[0].images[0].base64 == plain.images[0].base64


def test_taylorseer_caches_steps_and_the_hooks_that_fail_on_it_are_refused(run, settings, klein_distilled_dir):
    """TaylorSeer approximates passes and leaves the next job as it was; first-block and
    FasterCache, whose diffusers hooks fail on FLUX.2's transformer, are refused by field, and
    as the endpoint's CACHE they pass [klein] jobs by."""
    from schemas import CacheSpec, InferenceRequest
    from worker.engine import Engine

    fields = dict(prompt="a lighthouse", num_inference_steps=8, seed=8, model={"id": str(klein_distilled_dir)},
                  **SIZE)
    plain, _ = run(**fields)
    cached, _ = run(**fields, cache={"method": "taylorseer", "interval": 2})
    assert cached.cache.passes == 8 and 0 < cached.cache.approximated < 8
    assert cached.images[0].base64 != plain.images[0].base64
    assert run(**fields)[0].images[0].base64 == plain.images[0].base64
    for method in ("first_block", "faster"):
        with pytest.raises(UserInputError, match=rf"^cache.method: diffusers' {method} hook fails on FLUX.2 "
                                                 r"\[klein\]'s transformer: it takes taylorseer$"):
            run(**fields, cache={"method": method})
    endpoint = Engine(settings.model_copy(update={"cache": CacheSpec(method="first_block", threshold=0.5)}))
    passed_by = endpoint.generate(InferenceRequest.model_validate(fields), lambda _: None, lambda: False)
    assert passed_by.cache is None and passed_by.images[0].base64 == plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"image": "x"}, r"^task: .* is a FLUX.2 \[klein\] model; it runs txt2img, edit, inpaint, not img2img$"),
    ({"true_cfg_scale": 3.0}, r"^true_cfg_scale: .* is a FLUX.2 \[klein\] model: its guidance_scale is real "
                              r"classifier-free guidance already$"),
    ({"clip_skip": 2}, r"^clip_skip: .* is a FLUX.2 \[klein\] model; its prompts are read by a Qwen3 language model"),
    ({"controlnets": [{"id": "/x", "image": "x"}]}, r"^controlnets: .* is a FLUX.2 \[klein\] model; diffusers has no "
                                                    r"FLUX.2 ControlNet pipeline$"),
    ({"width": 72}, r"^width: must be a multiple of 16 for "),
    ({"prompt": "a (lighthouse:1.3)"}, r"^prompt: weights like \(word:1.2\), \[word\] and BREAK are read for SD 1.x, "
                                       r"2.x and XL models, not FLUX.2 \[klein\] ones"),
])
def test_what_it_cannot_do_is_refused_by_field(run, klein_dir, fields, message):
    if fields.get("image") == "x":
        fields["image"] = image_b64(stripes((64, 64)))
    with pytest.raises(UserInputError, match=message):
        run(**({"prompt": "p", "num_inference_steps": 2, "model": {"id": str(klein_dir)}} | fields))


def test_it_converts_to_an_archive_and_serves_from_it(settings, s3, klein_distilled_dir):
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, klein_distilled_dir, "klein/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


def test_quantized_and_offloaded_it_draws_close_to_the_whole_model(settings, klein_distilled_dir):
    """QUANTIZE=int8 (its transformer's linear layers, once at load) under OFFLOAD=model: the
    answer says so, and the image is close to the unquantized one."""
    from schemas import InferenceRequest
    from worker.engine import Engine

    request = InferenceRequest.model_validate(dict(prompt="a lighthouse", seed=9, num_inference_steps=4,
                                                   model={"id": str(klein_distilled_dir)}, **SIZE))
    plain = Engine(settings).generate(request, lambda _: None, lambda: False)
    endpoint = Engine(settings.model_copy(update={"quantize": "int8", "offload": "model"}))
    quantized = endpoint.generate(request, lambda _: None, lambda: False)
    assert quantized.model.quantize == "int8"
    transformer = endpoint.models.loaded()[0].pipeline.transformer
    assert type(transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    assert_images_close(ours(plain), ours(quantized), "klein-int8", tolerance=8)


def test_training_is_refused_naming_what_trains(settings, s3, klein_dir):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, klein_dir) == ("model.id: training supports SD 1.x/2.x, SDXL, SD3, FLUX.1, "
                                                         "Z-Image and Qwen-Image models, not Flux2KleinPipeline")


# --- FLUX.2 [dev] ---

def test_dev_txt2img_at_its_defaults_is_diffusers_flux2pipeline_at_its_own(run, flux2_dev_dir):
    """No steps, no guidance: Flux2Pipeline's own 50 steps and embedded guidance 4; the model
    names Mistral's processor (torchvision's), and the worker reads its tokenizer as diffusers
    would through it."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(flux2_dev_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    [expected] = diffusers_images(load(flux2_dev_dir, "dev"), prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "flux2-dev-defaults", tolerance=0)
    stronger, _ = run(prompt="a lighthouse", seed=1, guidance_scale=6.0, num_inference_steps=3,
                      model={"id": str(flux2_dev_dir)}, **SIZE)
    [expected] = diffusers_images(load(flux2_dev_dir, "dev"), prompt="a lighthouse", guidance_scale=6.0,
                                  num_inference_steps=3, **SIZE)
    assert_images_close(expected, ours(stronger), "flux2-dev-guidance", tolerance=0)


def test_dev_edits_several_images_as_diffusers_does(run, flux2_dev_dir):
    first, second = stripes((64, 64)), Image.new("RGB", (64, 96), (20, 40, 220))
    fields = dict(prompt="the coat of image 1 in the colour of image 2", num_inference_steps=2, **SIZE)
    result, _ = run(task="edit", images=[image_b64(first), image_b64(second)], seed=2,
                    model={"id": str(flux2_dev_dir)}, **fields)
    [expected] = diffusers_images(load(flux2_dev_dir, "dev"), seed=2, image=[first, second], **fields)
    assert_images_close(expected, ours(result), "flux2-dev-edit", tolerance=0)


@pytest.mark.parametrize("fields, message", [
    ({"negative_prompt": "fog"}, r"^negative_prompt: .* is a FLUX.2 \[dev\] model; its guidance is embedded"),
    ({"true_cfg_scale": 3.0}, r"^true_cfg_scale: .* is a FLUX.2 \[dev\] model; Flux2Pipeline has no true "),
    ({"image": "x", "mask_image": "x"}, r"^task: .* is a FLUX.2 \[dev\] model; it runs txt2img, edit, not inpaint$"),
    ({"clip_skip": 2}, r"^clip_skip: .* is a FLUX.2 \[dev\] model; its prompts are read by Mistral Small 3.1"),
])
def test_what_dev_cannot_do_is_refused_by_field(run, flux2_dev_dir, fields, message):
    fields = {k: image_b64(stripes((64, 64))) if v == "x" else v for k, v in fields.items()}
    with pytest.raises(UserInputError, match=message):
        run(**({"prompt": "p", "num_inference_steps": 2, "model": {"id": str(flux2_dev_dir)}} | fields))


def test_dev_converts_to_an_archive_with_its_tokenizer_and_serves_from_it(settings, s3, flux2_dev_dir):
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, flux2_dev_dir, "flux2/dev.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


def test_a_transformer_file_in_black_forest_labs_layout_converts_exactly(settings, http, klein_distilled_dir,
                                                                         tmp_path):
    """flux-2-klein-4b.safetensors' layout (q, k, v fused in the double blocks, BFL's names): told
    from its keys (not a FLUX.1 file, though it shares their double-block names), read by the
    transformer's single-file loader with model.id's configs, text encoder and VAE, it draws the
    source model's image."""
    from tests.fixtures.flux2 import write_bfl_checkpoint
    from tests.helpers import generate
    from worker.sources.checkpoints import missing_parts, reference_model

    bfl = write_bfl_checkpoint(klein_distilled_dir, tmp_path / "flux-2-klein-4b.safetensors")
    assert reference_model(bfl, "model.checkpoint_url") == "black-forest-labs/FLUX.2-klein-4B"
    assert missing_parts(bfl) == ["text_encoder", "vae"]
    http.files["/flux-2-klein-4b.safetensors"] = bfl.read_bytes()
    small = settings.model_copy(update={"max_loaded_models": 1})
    model = {"id": str(klein_distilled_dir)}
    converted = generate(small, model | {"checkpoint_url": http.url + "/flux-2-klein-4b.safetensors"})
    assert converted.model.source == "checkpoint"
    assert converted.images[0].base64 == generate(small, model).images[0].base64


def test_dev_reads_the_processors_chat_template_in_either_of_its_files(flux2_dev_dir, tmp_path):
    """Processors saved by older transformers keep their chat template in chat_template.json:
    the tokenizer the worker attaches applies that one, as the processor would."""
    import json
    import shutil

    from diffusers import Flux2Pipeline

    from worker.families.flux2 import FLUX2_DEV

    older = tmp_path / "older"
    shutil.copytree(flux2_dev_dir, older)
    template = (older / "tokenizer" / "chat_template.jinja").read_text()
    (older / "tokenizer" / "chat_template.jinja").unlink()
    marked = template.replace("[SYSTEM_PROMPT]", "[SYSTEM_PROMPT] ", 1)
    (older / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": marked}))
    pipe = Flux2Pipeline.from_pretrained(older, **FLUX2_DEV.own_components(older))
    FLUX2_DEV.attach(pipe, older)
    assert pipe.tokenizer.chat_template == marked
    assert load(flux2_dev_dir, "dev").tokenizer.chat_template == template


def test_compiled_regionally_it_draws_the_eager_image(settings, klein_distilled_dir):
    """COMPILE=regional on FLUX.2's transformer (its double and single blocks compiled once
    each): the answer says so, and the image is the eager one."""
    from schemas import InferenceRequest
    from worker.engine import Engine

    request = InferenceRequest.model_validate(dict(prompt="a lighthouse", seed=10, num_inference_steps=2,
                                                   model={"id": str(klein_distilled_dir)}, **SIZE))
    eager = Engine(settings).generate(request, lambda _: None, lambda: False)
    compiled = Engine(settings.model_copy(update={"compile": "regional"})).generate(request, lambda _: None,
                                                                                     lambda: False)
    assert eager.model.compile is None and compiled.model.compile == "regional"
    assert_images_close(ours(eager), ours(compiled), "klein-compiled", tolerance=2)

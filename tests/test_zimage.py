"""Z-Image (worker/families/zimage.py) on a tiny random pipeline built offline (a Qwen3 text
encoder and a byte-level Qwen tokenizer with its chat template): txt2img at diffusers' defaults,
img2img and inpainting as diffusers' own pipelines draw them, a LoRA for one request, and what
it refuses, by field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_images_close, decode, image_b64, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


def diffusers_image(model_dir, cls: str = "ZImagePipeline", seed: int = 1, **fields):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**fields, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def ours(result):
    return decode(result.images[0].base64)


def test_txt2img_at_its_defaults_is_diffusers_zimagepipeline_at_its_own(run, zimage_dir):
    """No steps, no guidance: ZImagePipeline's own 50 steps and guidance 5 (CFG on)."""
    result, events = run(prompt="a lighthouse", seed=1, model={"id": str(zimage_dir)}, **SIZE)
    assert [e.total for e in events if e.stage == "inference"][-1] == 50
    assert result.model.precision == "fp32"  # (bf16 on CUDA)
    expected = diffusers_image(zimage_dir, prompt="a lighthouse", **SIZE)
    assert_images_close(expected, ours(result), "zimage-defaults", tolerance=0)


def test_turbo_settings_and_a_negative_prompt_are_diffusers_own(run, zimage_dir):
    """Turbo's way (few steps, guidance 0: no CFG), and CFG with a negative prompt, each as
    diffusers draws it; two images of a batch, each its seed's."""
    turbo = dict(prompt="a lighthouse", num_inference_steps=4, guidance_scale=0.0, **SIZE)
    result, _ = run(seed=2, num_images=2, model={"id": str(zimage_dir)}, **turbo)
    assert_images_close(diffusers_image(zimage_dir, seed=3, **turbo), decode(result.images[1].base64), "zimage-turbo",
                        tolerance=0)
    cfg = dict(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=3, guidance_scale=4.0, **SIZE)
    result, _ = run(seed=2, model={"id": str(zimage_dir)}, **cfg)
    assert_images_close(diffusers_image(zimage_dir, seed=2, **cfg), ours(result), "zimage-negative", tolerance=0)


def test_img2img_is_diffusers_zimageimg2img_at_the_inputs_size(run, zimage_dir):
    image = stripes((96, 64))
    result, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=4, image=image_b64(image),
                    model={"id": str(zimage_dir)})
    expected = diffusers_image(zimage_dir, "ZImageImg2ImgPipeline", seed=3, prompt="a lighthouse",
                               num_inference_steps=4, image=image, width=96, height=64)  # (strength: its 0.6)
    assert_images_close(expected, ours(result), "zimage-img2img", tolerance=0)


def test_inpainting_is_diffusers_zimageinpaint_and_keeps_the_rest(run, zimage_dir):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted
    fields = dict(prompt="a lighthouse", num_inference_steps=3)
    raw, _ = run(seed=4, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0, keep_unmasked=False,
                 model={"id": str(zimage_dir)}, **fields)
    expected = diffusers_image(zimage_dir, "ZImageInpaintPipeline", seed=4, image=image, mask_image=mask,
                               width=64, height=64, **fields)
    assert_images_close(expected, ours(raw), "zimage-inpaint", tolerance=0)
    kept, _ = run(seed=4, image=image_b64(image), mask_image=image_b64(mask), mask_blur=0,
                  model={"id": str(zimage_dir)}, **fields)
    pixels = np.asarray(ours(kept).convert("RGB")).astype(int)
    assert (pixels[:, 40:] == (200, 30, 30)).all()  # kept exactly
    assert np.abs(pixels[:, :24] - (200, 30, 30)).max() > 20  # repainted


def test_a_lora_for_one_request_is_diffusers_own_and_gone_after(run, zimage_dir, tmp_path):
    import diffusers

    from tests.fixtures.lora_files import make_transformer_lora

    lora = make_transformer_lora(zimage_dir, tmp_path / "zimage-lora.safetensors", "ZImagePipeline")
    fields = dict(prompt="a lighthouse", num_inference_steps=3, **SIZE)
    plain, _ = run(seed=5, model={"id": str(zimage_dir)}, **fields)
    styled, _ = run(seed=5, model={"id": str(zimage_dir)}, loras=[{"id": str(lora), "scale": 0.8}], **fields)
    pipe = diffusers.ZImagePipeline.from_pretrained(zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    expected = pipe(**fields, generator=torch.Generator().manual_seed(5)).images[0]
    assert_images_close(expected, ours(styled), "zimage-lora", tolerance=1)
    assert styled.images[0].base64 != plain.images[0].base64
    assert run(seed=5, model={"id": str(zimage_dir)}, **fields)[0].images[0].base64 == plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"clip_skip": 2}, r"^clip_skip: .* is a Z-Image model; its prompts are read by a Qwen3 language model"),
    ({"tiling": True}, r"^tiling: .* is a Z-Image model; seamless tiling needs a UNet"),
    ({"hires": {"scale": 1.5}}, r"^hires: .* is a Z-Image model; the hires fix here is for SD 1.x, 2.x and XL"),
    ({"controlnets": [{"id": "/x", "image": "x"}]}, r"^controlnets: .* is a Z-Image model; ControlNets for Z-Image"),
    ({"true_cfg_scale": 4.0}, r"^true_cfg_scale: .* is a Z-Image model: its guidance_scale is real"),
    ({"cache": {"method": "first_block"}}, r"^cache: .* is a Z-Image model: its ZImageTransformer2DModel has no "),
    ({"width": 72}, r"^width: must be a multiple of 16 for "),
    ({"prompt": "a (lighthouse:1.3)"}, r"^prompt: weights like \(word:1.2\), \[word\] and BREAK are read for SD 1.x, "
                                       r"2.x and XL models, not Z-Image ones"),
])
def test_what_it_cannot_do_is_refused_by_field(run, zimage_dir, fields, message):
    with pytest.raises(UserInputError, match=message):
        run(**({"prompt": "p", "num_inference_steps": 4, "model": {"id": str(zimage_dir)}} | fields))


def test_it_converts_to_an_archive_and_serves_from_it(settings, s3, zimage_dir):
    """task convert publishes a Z-Image model as a safetensors archive (its Qwen tokenizer and
    chat template too); a fresh worker with an empty cache serves the same image from it."""
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, zimage_dir, "zimage/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


def test_lora_training_publishes_a_lora_a_later_request_uses(settings, s3, zimage_dir):
    """train_dreambooth_lora_z_image.py's recipe (flow matching, the transformer's negated
    velocity, each prompt encoded once at its own length), with prior preservation and mirrored
    images: a LoRA of the attention, in diffusers' Z-Image layout, which changes a later image."""
    from tests.helpers import train_then_use

    result, keys, plain, tuned = train_then_use(settings, s3, zimage_dir, "lora", "zimage/trained-lora",
                                                max_train_steps=2, random_flip=True)
    assert result["train"]["steps"] == 2 and result["train"]["loss"] > 0
    assert {key.split(".")[0] for key in keys} == {"transformer"}
    for layer in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"):
        assert any(f".{layer}.lora_A." in key for key in keys), layer
    assert tuned.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"method": "dreambooth"}, "train.method: Z-Image models train LoRAs here"),
    ({"train_text_encoder": True}, "train.train_text_encoder: Z-Image models train their transformer only here"),
    ({"resolution": 72}, "train.resolution: must be a multiple of 16 for Z-Image models, got 72"),
])
def test_what_its_training_does_not_do_is_refused_by_field(settings, s3, zimage_dir, fields, message):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, zimage_dir, **fields).startswith(message)


def test_a_transformer_file_in_the_original_layout_converts_exactly(settings, http, zimage_dir, tmp_path):
    """z_image_turbo_bf16.safetensors' layout (fused q, k, v; Z-Image's own names): converted with
    model.id's configs, text encoder and VAE, it draws the source model's image; its keys name it
    Z-Image's (diffusers' reference, Z-Image-Turbo, for the configs where model.id is absent)."""
    from tests.fixtures.zimage import write_original_checkpoint
    from tests.helpers import generate
    from worker.families import checkpoint_lacks, checkpoint_reference
    from worker.sources.checkpoints import checkpoint_keys

    original = write_original_checkpoint(zimage_dir, tmp_path / "z_image_turbo.safetensors")
    keys = checkpoint_keys(original)
    assert checkpoint_reference(keys, False) == "z-image-turbo"
    assert checkpoint_lacks(keys, True) == ["text_encoder", "vae"]
    http.files["/z_image_turbo.safetensors"] = original.read_bytes()
    small = settings.model_copy(update={"max_loaded_models": 1})
    model = {"id": str(zimage_dir)}
    converted = generate(small, model | {"checkpoint_url": http.url + "/z_image_turbo.safetensors"})
    assert converted.model.source == "checkpoint"
    assert converted.images[0].base64 == generate(small, model).images[0].base64

"""Tier 2: the engine on tiny random-weight models, on CPU."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from schemas import SCHEDULERS
from tests.helpers import FileServer, assert_images_close, decode, png_b64, stripes
from worker.errors import JobCancelled, UserInputError

STEPS = 3


def test_same_seed_same_bytes(run):
    first, _ = run(prompt="a red fox", seed=7, num_inference_steps=STEPS)
    second, _ = run(prompt="a red fox", seed=7, num_inference_steps=STEPS)
    other, _ = run(prompt="a red fox", seed=8, num_inference_steps=STEPS)
    assert first.images[0].base64 == second.images[0].base64
    assert first.images[0].base64 != other.images[0].base64
    assert first.images[0].seed == 7


def test_random_seed_is_reported_and_reproduces(run):
    result, _ = run(prompt="a red fox", num_inference_steps=STEPS)
    seed = result.images[0].seed
    assert 0 <= seed < 2**63
    again, _ = run(prompt="a red fox", num_inference_steps=STEPS, seed=seed)
    assert again.images[0].base64 == result.images[0].base64


def test_each_image_of_a_batch_reproduces_alone(run):
    batch, _ = run(prompt="three foxes", seed=100, num_images=3, num_inference_steps=STEPS)
    assert [image.seed for image in batch.images] == [100, 101, 102]
    assert len({image.base64 for image in batch.images}) == 3
    for image in batch.images:
        alone, _ = run(prompt="three foxes", seed=image.seed, num_inference_steps=STEPS)
        assert_images_close(decode(alone.images[0].base64), decode(image.base64), f"batch-seed-{image.seed}")


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_in_the_table_runs(run, name, request):
    from schemas.schedulers import is_flow_matching

    # Flow-matching schedulers sample flow-matching models (SD3), the others the rest.
    model = {"id": str(request.getfixturevalue("sd3_dir"))} if is_flow_matching(SCHEDULERS[name].cls) else {}
    result, events = run(prompt="p", seed=1, num_inference_steps=4, scheduler=name, guidance_scale=1.5, model=model)
    assert decode(result.images[0].base64).size == (64, 64)
    steps = [e.step for e in events if e.stage == "inference"]
    assert steps == list(range(1, len(steps) + 1)) and steps


def test_scheduler_choice_does_not_leak_into_the_next_job(run):
    plain, _ = run(prompt="p", seed=3, num_inference_steps=STEPS)
    run(prompt="p", seed=3, num_inference_steps=STEPS, scheduler="EulerAncestralDiscrete")
    after, _ = run(prompt="p", seed=3, num_inference_steps=STEPS)
    assert after.images[0].base64 == plain.images[0].base64


def test_schedulers_change_the_image(run):
    ddim, _ = run(prompt="p", seed=3, num_inference_steps=STEPS, scheduler="DDIM")
    euler, _ = run(prompt="p", seed=3, num_inference_steps=STEPS, scheduler="EulerDiscrete")
    assert ddim.images[0].base64 != euler.images[0].base64


def test_size_is_honoured(run):
    result, _ = run(prompt="p", seed=1, num_inference_steps=2, width=96, height=128)
    image = result.images[0]
    assert (image.width, image.height) == (96, 128) == decode(image.base64).size


def test_progress_events_cover_every_step(run):
    result, events = run(prompt="p", seed=1, num_inference_steps=5, scheduler="DDIM")
    inference = [(e.step, e.total) for e in events if e.stage == "inference"]
    assert inference == [(i, 5) for i in range(1, 6)]


def test_img2img_starts_from_the_image(run):
    source = png_b64((250, 250, 250), size=(80, 64))
    result, events = run(prompt="p", seed=5, image=source, strength=0.5, num_inference_steps=4, scheduler="DDIM")
    assert result.task == "img2img"
    assert decode(result.images[0].base64).size == (80, 64)
    assert [e.total for e in events if e.stage == "inference"] == [2, 2]  # strength 0.5 of 4 steps
    dark, _ = run(prompt="p", seed=5, image=png_b64((5, 5, 5), size=(80, 64)), strength=0.5, num_inference_steps=4)
    assert dark.images[0].base64 != result.images[0].base64


def test_img2img_resizes_to_the_requested_size(run):
    result, _ = run(prompt="p", seed=5, image=png_b64(size=(100, 100)), width=64, height=96, num_inference_steps=2)
    assert decode(result.images[0].base64).size == (64, 96)


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_resize_mode_decides_which_part_of_an_image_of_another_shape_is_used(run, tiny_dir, tmp_path):
    """crop: the same image as sending its centre; fill: as sending it shrunk into the frame and
    filled out; stretch (the default): as sending it squeezed. For img2img, inpaint (image and
    mask together) and ControlNet images."""
    from diffusers.image_processor import VaeImageProcessor

    from tests.fixtures.controlnets import build_controlnet

    wide = stripes()
    centre = wide.crop((32, 0, 96, 64))
    job = {"prompt": "p", "seed": 5, "num_inference_steps": 2, "width": 64, "height": 64}

    def draw(**fields) -> str:
        return run(**(job | fields))[0].images[0].base64

    cropped = draw(image=_b64(wide), resize_mode="crop")
    assert cropped == draw(image=_b64(centre))
    filled = VaeImageProcessor().resize(wide, height=64, width=64, resize_mode="fill")
    assert draw(image=_b64(wide), resize_mode="fill") == draw(image=_b64(filled))
    assert draw(image=_b64(wide)) == draw(image=_b64(wide.resize((64, 64)))) != cropped

    hole = Image.new("L", (128, 64))
    hole.paste(255, (40, 16, 56, 48))  # left of the centre: cropping keeps 8 px to 24 px of it
    assert (draw(image=_b64(wide), mask_image=_b64(hole), resize_mode="crop")
            == draw(image=_b64(centre), mask_image=_b64(hole.crop((32, 0, 96, 64)))))

    net = {"id": str(build_controlnet(tiny_dir, tmp_path / "net"))}
    assert (draw(controlnets=[net | {"image": _b64(wide)}], resize_mode="crop")
            == draw(controlnets=[net | {"image": _b64(centre)}]))
    with pytest.raises(Exception, match="resize_mode: no image to resize"):
        draw(resize_mode="crop")


def test_inpaint_on_the_embedded_4_channel_model(run):
    result, _ = run(prompt="p", seed=5, image=png_b64(), mask_image=png_b64((255, 255, 255), mode="RGB"),
                    num_inference_steps=4)
    assert result.task == "inpaint" and decode(result.images[0].base64).size == (64, 64)


def test_inpaint_with_a_9_channel_unet(run, inpaint_dir):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    result, _ = run(prompt="p", seed=5, image=png_b64(), mask_image=base64.b64encode(buffer.getvalue()).decode(),
                    num_inference_steps=4, model={"id": str(inpaint_dir)})
    assert result.model.source in ("local", "memory")
    assert decode(result.images[0].base64).size == (64, 64)
    with pytest.raises(UserInputError, match=r"^task: .* is an inpainting model"):
        run(prompt="p", model={"id": str(inpaint_dir)}, num_inference_steps=2)


@pytest.mark.parametrize("fmt, pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(run, fmt, pil_name):
    result, _ = run(prompt="p", seed=1, num_inference_steps=2, output={"format": fmt, "quality": 80})
    image = result.images[0]
    assert image.format == fmt and decode(image.base64).format == pil_name


def test_switching_tasks_reuses_the_loaded_model(run, engine):
    run(prompt="p", num_inference_steps=2)
    def warm() -> dict:
        return {id(m.pipeline): m.ref for m in engine.models.loaded()}

    loaded = warm()
    img2img, _ = run(prompt="p", image=png_b64(), num_inference_steps=2)
    inpaint, _ = run(prompt="p", image=png_b64(), mask_image=png_b64(), num_inference_steps=2)
    for result in (img2img, inpaint):
        assert result.model.source == "memory" and "load" not in result.timings
    assert warm() == loaded  # the same pipeline objects, nothing reloaded


def test_cancellation_stops_the_denoising_loop(run):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(JobCancelled):
        run(prompt="p", num_inference_steps=10, scheduler="DDIM", cancelled=cancelled)
    assert len(calls) == 2


def test_timings_name_the_phases_that_ran(run):
    result, _ = run(prompt="p", num_inference_steps=2)
    assert set(result.timings) == {"inference", "encode"}
    result, _ = run(prompt="p", image=png_b64(), num_inference_steps=2)
    assert set(result.timings) == {"inputs", "inference", "encode"}


def test_image_from_a_url(run):
    server = FileServer({
        "/cat.png": (200, {"Content-Type": "image/png"}, base64.b64decode(png_b64((0, 0, 255)))),
        "/moved": (302, {"Location": "/cat.png"}, b""),
        "/notimage": (200, {}, b"hello"),
    })
    try:
        direct, _ = run(prompt="p", seed=2, image=server.url + "/cat.png", num_inference_steps=2)
        redirected, _ = run(prompt="p", seed=2, image=server.url + "/moved", num_inference_steps=2)
        inline, _ = run(prompt="p", seed=2, image=png_b64((0, 0, 255)), num_inference_steps=2)
        assert direct.images[0].base64 == redirected.images[0].base64 == inline.images[0].base64
        with pytest.raises(UserInputError, match=r"^image: download failed \(HTTP 404\)"):
            run(prompt="p", image=server.url + "/missing.png", num_inference_steps=2)
        with pytest.raises(UserInputError, match=r"^mask_image: is not a readable image"):
            run(prompt="p", image=png_b64(), mask_image=server.url + "/notimage", num_inference_steps=2)
    finally:
        server.close()


def test_private_urls_are_refused_by_default(models_dir):
    from worker.images import load_image
    from worker.settings import Settings

    server = FileServer({"/cat.png": (200, {}, base64.b64decode(png_b64()))})
    try:
        strict = Settings(models_dir=models_dir)
        for url in (server.url + "/cat.png", "http://localhost:9/x.png", "http://169.254.169.254/latest/meta-data"):
            with pytest.raises(UserInputError, match=r"^image: host .* is a private address"):
                load_image(url, "image", strict)
        # A public host that redirects inward is refused at the hop: checked in test_urls.
        assert load_image(server.url + "/cat.png", "image", Settings(models_dir=models_dir, allow_private_urls=True))
    finally:
        server.close()


def test_connections_to_private_addresses_are_refused_even_after_the_name_check():
    """DNS rebinding: the name looked public when checked, the connection lands on a private
    address. The connected socket is checked before anything is sent on it."""
    from tests.helpers import RangeServer
    from worker.sources.urls import open_url, session_for

    server = RangeServer({"/secret": b"internal"})
    try:
        with pytest.raises(UserInputError, match=r"^image: host '127\.0\.0\.1' is a private address"):
            # allow_private=True here skips only the name check, standing in for a DNS answer
            # that was public then and private now; the session still refuses the peer.
            open_url(session_for(allow_private=False), server.url + "/secret", "image", allow_private=True, timeout=5)
        assert server.requests == []  # not a byte reached it
    finally:
        server.close()


def test_bad_image_payloads_name_the_field(run):
    with pytest.raises(UserInputError, match=r"^image: is not a readable image"):
        run(prompt="p", image=base64.b64encode(b"definitely not a png").decode(), num_inference_steps=2)
    with pytest.raises(UserInputError, match=r"^image: is not valid base64"):
        run(prompt="p", image="abc=def", num_inference_steps=2)
    with pytest.raises(UserInputError, match=r"^image: 16x16 is smaller than 64x64"):
        run(prompt="p", image=png_b64(size=(16, 16)), num_inference_steps=2)
    with pytest.raises(UserInputError, match=r"^safety_checker: .* ships no safety checker"):
        run(prompt="p", safety_checker=True, num_inference_steps=2)


def test_attention_runs_on_pytorch_sdpa(run, engine):
    run(prompt="p", num_inference_steps=1)
    for loaded in engine.models.loaded():  # (an SD3 model too, when another test left one)
        denoiser = getattr(loaded.pipeline, "unet", None) or loaded.pipeline.transformer
        kinds = {type(p).__name__ for p in denoiser.attn_processors.values()}
        # Both call torch.nn.functional.scaled_dot_product_attention.
        assert kinds in ({"AttnProcessor2_0"}, {"JointAttnProcessor2_0"}), kinds


def test_results_over_the_size_limit_fail_with_a_reason(models_dir):
    from schemas import InferenceRequest
    from worker.engine import Engine
    from worker.settings import Settings

    engine = Engine(Settings(models_dir=models_dir, max_result_bytes=20_000))
    request = InferenceRequest(prompt="p", num_inference_steps=1, num_images=2, width=128, height=128)
    with pytest.raises(UserInputError, match=r"^output: the images come to .* MB result limit"):
        engine.generate(request, lambda e: None, lambda: False)
    small = InferenceRequest(prompt="p", num_inference_steps=1)
    assert engine.generate(small, lambda e: None, lambda: False).images


def test_data_uri_and_unpadded_base64_are_accepted(run):
    plain = png_b64()
    a, _ = run(prompt="p", seed=1, image="data:image/png;base64," + plain, num_inference_steps=2)
    b, _ = run(prompt="p", seed=1, image=plain.rstrip("="), num_inference_steps=2)
    assert a.images[0].base64 == b.images[0].base64


def test_clip_skip_uses_an_earlier_text_encoder_layer(run):
    plain, _ = run(prompt="a lighthouse", num_inference_steps=2, seed=3)
    skipped, _ = run(prompt="a lighthouse", num_inference_steps=2, seed=3, clip_skip=1)
    assert skipped.images[0].base64 != plain.images[0].base64
    again, _ = run(prompt="a lighthouse", num_inference_steps=2, seed=3)
    assert again.images[0].base64 == plain.images[0].base64  # per request only
    with pytest.raises(UserInputError, match=r"^clip_skip: at most 1 for the embedded model, got 2"):
        run(prompt="a lighthouse", num_inference_steps=2, clip_skip=2)  # its text encoder has 2 layers


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_images_say_how_they_were_made(run, fmt):
    result, _ = run(prompt="a lighthouse", negative_prompt="fog", num_inference_steps=2, seed=77,
                    scheduler="EulerDiscrete", output={"format": fmt, "metadata": True})
    image = decode(result.images[0].base64)
    text = image.info["parameters"] if fmt == "png" else image.getexif()[0x010E]
    assert text.splitlines()[:2] == ["a lighthouse", "Negative prompt: fog"]
    assert "Steps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 77, Size: 64x64" in text  # A1111 names it so
    bare, _ = run(prompt="a lighthouse", num_inference_steps=2, seed=77, output={"format": fmt})  # the default
    plain = decode(bare.images[0].base64)
    assert "parameters" not in plain.info and 0x010E not in plain.getexif()
    assert len(bare.images[0].base64) < len(result.images[0].base64)


def test_images_over_vae_tiling_pixels_go_through_the_vae_in_tiles(engine):
    """Tiles blend at their seams, so a tiled image differs a little; smaller ones are not tiled,
    also right after a tiled one (the VAE is shared by every job on the model)."""
    from schemas import InferenceRequest
    from worker.engine import Engine

    tiling = Engine(engine.settings.model_copy(update={"vae_tiling_pixels": 100 * 100}))

    def image(on, **fields) -> str:
        request = InferenceRequest.model_validate({"prompt": "a fox", "num_inference_steps": 2, "seed": 3} | fields)
        return on.generate(request, lambda _: None, lambda: False).images[0].base64

    large = image(tiling, width=128, height=128)
    assert decode(large).size == (128, 128) and large != image(engine, width=128, height=128)
    assert image(tiling, width=96, height=96) == image(engine, width=96, height=96)  # 9216 pixels: whole
    assert image(tiling, image=png_b64(size=(128, 128))) != image(engine, image=png_b64(size=(128, 128)))  # encode too


def test_more_images_than_max_batch_size_run_in_batches_each_image_as_alone(engine):
    from schemas import InferenceRequest
    from worker.engine import Engine

    one_at_a_time = Engine(engine.settings.model_copy(update={"max_batch_size": 1}))

    def job(on, **fields):
        request = InferenceRequest.model_validate({"prompt": "foxes", "num_inference_steps": 3, "seed": 40,
                                                   "scheduler": "EulerDiscrete"} | fields)
        events = []
        return on.generate(request, events.append, lambda: False), events

    batched, events = job(one_at_a_time, num_images=3)
    assert [i.seed for i in batched.images] == [40, 41, 42]
    assert [e.step for e in events if e.stage == "inference"] == [1, 2, 3] * 3  # three denoising runs
    for image in batched.images:  # a batch of one: bit for bit the image of a request for it alone
        assert image.base64 == job(engine, seed=image.seed)[0].images[0].base64


def test_metadata_names_the_vae_controlnet_and_ip_adapter(run, tiny_dir, tmp_path):
    from tests.fixtures.controlnets import build_controlnet
    from tests.fixtures.ip_adapters import WEIGHTS, build_ip_adapter

    net, adapter = build_controlnet(tiny_dir, tmp_path / "net"), build_ip_adapter(tiny_dir, tmp_path / "ip")
    result, _ = run(prompt="a fox", num_inference_steps=2, seed=1, output={"metadata": True},
                    vae={"id": str(tiny_dir / "vae")},
                    controlnets=[{"id": str(net), "image": png_b64(), "scale": 0.5}],
                    ip_adapter={"id": str(adapter), "weight_name": WEIGHTS, "image": png_b64(), "scale": 0.7})
    text = decode(result.images[0].base64).info["parameters"]
    assert f'ControlNet 0: "Model: {net}, Weight: 0.5, Guidance Start: 0.0, Guidance End: 1.0"' in text
    assert f"IP-Adapter: {adapter}/{WEIGHTS}:0.7" in text and f"VAE: {tiny_dir / 'vae'}" in text


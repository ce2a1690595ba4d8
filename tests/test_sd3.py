"""Stable Diffusion 3 through the worker, on a tiny random-weight SD3 model (MMDiT, CLIP-L,
OpenCLIP-G and T5, flow matching): every task, sizes in its multiple of 16, its schedulers,
LoRAs, an archive round trip, and what it refuses by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import InferenceRequest
from tests.helpers import BUCKET, decode, png_b64

BASE = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "seed": 5}


def sd3(run, sd3_dir, **fields):
    result, events = run(**(BASE | {"model": {"id": str(sd3_dir)}} | fields))
    return result


def refused(run, sd3_dir, **fields) -> str:
    from worker.errors import UserInputError

    with pytest.raises(UserInputError) as info:
        sd3(run, sd3_dir, **fields)
    return str(info.value)


@pytest.mark.parametrize("task, fields, size", [
    ("txt2img", {}, (64, 64)),
    ("txt2img", {"width": 96, "height": 64}, (96, 64)),
    # The input's size, not SD3's default (its img2img pipeline resizes to 1024 px unless told).
    ("img2img", {"image": png_b64(size=(96, 64))}, (96, 64)),
    ("inpaint", {"image": png_b64(size=(96, 64)), "mask_image": png_b64((255, 255, 255), size=(96, 64))}, (96, 64)),
    # Sizes taken from an image are rounded down to SD3's multiple of 16.
    ("img2img", {"image": png_b64(size=(100, 72))}, (96, 64)),
])
def test_every_task_runs_on_sd3_at_the_size_asked(run, sd3_dir, task, fields, size):
    result = sd3(run, sd3_dir, **fields)
    assert result.task == task
    assert decode(result.images[0].base64).size == size == (result.images[0].width, result.images[0].height)


@pytest.mark.parametrize("fields", [
    {"image": png_b64(size=(64, 64))},
    {"image": png_b64(size=(64, 64)), "mask_image": png_b64((255, 255, 255), size=(64, 64))},
])
def test_several_sd3_images_from_one_input_each_reproduce_alone(run, sd3_dir, fields):
    from tests.helpers import assert_images_close

    batch = sd3(run, sd3_dir, num_images=3, **fields)
    assert len({image.base64 for image in batch.images}) == 3
    alone = sd3(run, sd3_dir, seed=batch.images[2].seed, **fields)
    assert_images_close(decode(alone.images[0].base64), decode(batch.images[2].base64), "sd3-batch-seed")


def test_what_a_request_leaves_out_takes_diffusers_sd3_defaults(run, sd3_dir):
    """No steps, no guidance: StableDiffusion3Pipeline's own 28 steps and guidance 7 (not the
    schema's 25 and 7.5); img2img leaving strength out: its pipeline's 50 steps and 0.6."""
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    from tests.helpers import assert_images_close, stripes

    result, events = run(prompt="a lighthouse", seed=1, width=64, height=64, model={"id": str(sd3_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 28
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a lighthouse", width=64, height=64, generator=torch.Generator().manual_seed(1)).images[0]
    assert_images_close(expected, decode(result.images[0].base64), "sd3-defaults", tolerance=0)
    image = stripes((64, 64))
    from tests.helpers import image_b64

    result, events = run(prompt="a lighthouse", seed=2, image=image_b64(image), model={"id": str(sd3_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 30  # 0.6 of 50
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a lighthouse", image=image, generator=torch.Generator().manual_seed(2)).images[0]
    assert_images_close(expected, decode(result.images[0].base64), "sd3-img2img-defaults", tolerance=0)


def test_sd3_reproduces_and_takes_the_flow_matching_schedulers(run, sd3_dir):
    first = sd3(run, sd3_dir)
    assert sd3(run, sd3_dir).images[0].base64 == first.images[0].base64
    heun = sd3(run, sd3_dir, scheduler="FlowMatchHeunDiscrete")
    assert heun.images[0].base64 != first.images[0].base64
    assert sd3(run, sd3_dir, scheduler="FlowMatchEulerDiscreteScheduler").images[0].base64 == first.images[0].base64


def test_schedulers_of_the_other_kind_are_refused_by_name(run, sd3_dir):
    from worker.errors import UserInputError

    message = refused(run, sd3_dir, scheduler="DPMSolverMultistep")
    assert message.startswith("scheduler: DPMSolverMultistep") and "FlowMatchEulerDiscrete" in message
    with pytest.raises(UserInputError, match="^scheduler: FlowMatchEulerDiscrete .*DPMSolverMultistep"):
        run(**BASE, scheduler="FlowMatchEulerDiscrete")  # the embedded SD model


def test_sizes_must_be_multiples_of_16(run, sd3_dir):
    assert refused(run, sd3_dir, width=72, height=64) == f"width: must be a multiple of 16 for {sd3_dir}, got 72"


def test_hires_fix_on_sd3_rounds_to_its_multiple(run, sd3_dir):
    for upscaler in ("latent", "lanczos"):
        result = sd3(run, sd3_dir, width=80, height=96, hires={"scale": 1.3, "upscaler": upscaler})
        assert decode(result.images[0].base64).size == (96, 112)  # 104 x 124.8, rounded down to 16
        assert "hires" in result.timings


def test_long_prompts_go_to_t5_and_weights_are_refused_by_name(run, sd3_dir):
    plain = sd3(run, sd3_dir)
    long = sd3(run, sd3_dir, prompt="a lighthouse at dusk, " * 30)  # past CLIP's 77 tokens: T5 reads on
    assert long.images[0].base64 != plain.images[0].base64
    assert refused(run, sd3_dir, prompt="a (lighthouse:1.3)").startswith("prompt: weights like (word:1.2)")
    assert refused(run, sd3_dir, negative_prompt="blurry BREAK dark").startswith("negative_prompt: weights")
    literal = sd3(run, sd3_dir, prompt="a (lighthouse:1.3)", prompt_weighting=False)
    assert literal.images[0].base64 != plain.images[0].base64


def test_a_lora_on_sd3_for_that_request_only(run, sd3_dir, tmp_path):
    from tests.fixtures.sd3 import make_sd3_lora

    lora = make_sd3_lora(sd3_dir, tmp_path / "sd3-lora.safetensors")
    plain = sd3(run, sd3_dir)
    styled = sd3(run, sd3_dir, loras=[{"id": str(lora)}])
    assert styled.images[0].base64 != plain.images[0].base64
    assert sd3(run, sd3_dir).images[0].base64 == plain.images[0].base64


def test_loras_of_another_architecture_are_refused_and_the_model_stays_plain(run, sd3_dir, tmp_path, tiny_dir):
    from tests.fixtures.lora_files import make_lora
    from tests.fixtures.sd3 import make_sd3_lora
    from worker.errors import UserInputError

    plain = sd3(run, sd3_dir)
    sd_lora = make_lora(tiny_dir, tmp_path / "sd.safetensors")
    assert refused(run, sd3_dir, loras=[{"id": str(sd_lora)}]).startswith("loras[0]: matches no layer of this model")
    assert sd3(run, sd3_dir).images[0].base64 == plain.images[0].base64
    sd3_lora = make_sd3_lora(sd3_dir, tmp_path / "sd3.safetensors")
    with pytest.raises(UserInputError, match=r"^loras\[0\]: matches no layer"):
        run(**BASE, loras=[{"id": str(sd3_lora)}])  # on the embedded SD model


@pytest.mark.parametrize("field, value", [
    ("ip_adapter", {"id": "h94/IP-Adapter", "weight_name": "models/ip-adapter_sd15.safetensors", "image": png_b64()}),
    ("embeddings", [{"id": "/nowhere/embedding.safetensors", "token": "<x>"}]),
    ("refiner", {"id": "/nowhere/refiner"}),
])
def test_parts_made_for_unet_models_are_refused_by_field(run, sd3_dir, field, value):
    message = refused(run, sd3_dir, **{field: value})
    assert message.startswith(f"{field}: {sd3_dir} is ") and ("SD3" in message or "SDXL" in message)


@pytest.fixture(scope="module")
def sd3_nets(sd3_dir, tmp_path_factory):
    from tests.fixtures.controlnets import build_sd3_controlnet

    root = tmp_path_factory.mktemp("sd3-controlnets")
    return [str(build_sd3_controlnet(sd3_dir, root / f"net{i}", seed=i)) for i in range(2)]


def test_sd3_controlnets_steer_txt2img(run, sd3_dir, sd3_nets):
    red, blue = png_b64((220, 20, 20), size=(96, 64)), png_b64((20, 20, 220), size=(96, 64))
    plain = sd3(run, sd3_dir, width=96, height=64)
    steered = sd3(run, sd3_dir, controlnets=[{"id": sd3_nets[0], "image": red}])
    assert decode(steered.images[0].base64).size == (96, 64)  # the control image's size
    assert steered.images[0].base64 != plain.images[0].base64
    assert sd3(run, sd3_dir, controlnets=[{"id": sd3_nets[0], "image": blue}]).images[0].base64 != \
        steered.images[0].base64
    off = sd3(run, sd3_dir, controlnets=[{"id": sd3_nets[0], "image": red, "scale": 0}])
    assert off.images[0].base64 == plain.images[0].base64
    both = sd3(run, sd3_dir, controlnets=[{"id": sd3_nets[0], "image": red}, {"id": sd3_nets[1], "image": blue}])
    assert both.images[0].base64 not in (plain.images[0].base64, steered.images[0].base64)
    assert sd3(run, sd3_dir, width=96, height=64).images[0].base64 == plain.images[0].base64


def test_controlnets_of_the_other_kind_and_what_sd3_ones_do_not_do_are_refused(run, sd3_dir, sd3_nets, tiny_dir,
                                                                                 tmp_path):
    from tests.fixtures.controlnets import build_controlnet
    from worker.errors import UserInputError

    sd_net = str(build_controlnet(tiny_dir, tmp_path / "sd-net"))
    assert refused(run, sd3_dir, controlnets=[{"id": sd_net, "image": png_b64()}]) == (
        f"controlnets[0]: {sd_net} is a ControlNet for SD 1.x, 2.x or XL models (ControlNetModel), not for this one")
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* is a ControlNet for SD3 models"):
        run(**BASE, controlnets=[{"id": sd3_nets[0], "image": png_b64()}])  # on the embedded SD model
    net = {"id": sd3_nets[0], "image": png_b64()}
    assert refused(run, sd3_dir, controlnets=[net], image=png_b64()).startswith(
        "controlnets: ") and "txt2img only" in refused(run, sd3_dir, controlnets=[net], image=png_b64())
    assert refused(run, sd3_dir, controlnets=[net], hires={"scale": 2}).startswith("hires: ")


def test_sd3_controlnets_are_not_read_from_single_files(run, sd3_dir, sd3_nets):
    from worker.errors import ModelSourceError

    file = f"{sd3_nets[0]}/diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.id: could not load the ControlNet "
                                               r"\(ValueError: SD3 ControlNets load from their diffusers directory"):
        sd3(run, sd3_dir, controlnets=[{"id": file, "image": png_b64()}])


def test_sd3_without_its_t5(run, engine, sd3_dir, tmp_path):
    """model.t5 false: the pipeline runs on its CLIPs alone, beside the full model if both are
    asked for, and needs no T5 weights on disk."""
    import shutil

    full = sd3(run, sd3_dir)
    lean = sd3(run, sd3_dir, model={"id": str(sd3_dir), "t5": False})
    assert lean.images[0].base64 != full.images[0].base64  # T5's part of the conditioning is gone
    pipelines = {loaded.ref.t5: loaded.pipeline for loaded in engine.models.loaded() if loaded.ref.id == str(sd3_dir)}
    assert pipelines[False].text_encoder_3 is None and pipelines[True].text_encoder_3 is not None
    assert sd3(run, sd3_dir, model={"id": str(sd3_dir), "t5": False}).model.source == "memory"

    no_t5 = tmp_path / "sd3-without-t5"  # as a hub download with t5 false leaves it
    shutil.copytree(sd3_dir, no_t5, ignore=lambda folder, names: [
        n for n in names if Path(folder).name == "text_encoder_3" and n.endswith(".safetensors")])
    assert sd3(run, sd3_dir, model={"id": str(no_t5), "t5": False}).images[0].base64 == lean.images[0].base64


def test_a_hub_snapshot_without_t5_serves_t5_false_only(settings, sd3_dir, tmp_path):
    """What a download with t5 false left in the hub cache is not the full model: a request for
    that wants T5 fetched (here, offline, it says it is missing), not a failed load."""
    import shutil

    from tests.helpers import generate, hub_cache
    from worker.errors import ModelSourceError

    no_t5 = tmp_path / "sd3-without-t5"
    shutil.copytree(sd3_dir, no_t5, ignore=lambda folder, names: ["text_encoder_3"] if folder == str(sd3_dir) else [])
    worker = settings.model_copy(update={"hf_hub_cache": hub_cache(tmp_path / "hub", "acme/sd3", no_t5,
                                                                   {"main": "4" * 40})})
    assert generate(worker, {"id": "acme/sd3", "t5": False}).model.source == "cache"
    with pytest.raises(ModelSourceError, match="^model.id: acme/sd3 is not cached on this worker and HF_HUB_OFFLINE"):
        generate(worker, {"id": "acme/sd3"})


def test_sd3_converts_without_t5_to_an_archive_of_its_own(settings, s3, sd3_dir, tmp_path):
    """convert with model.t5 false: a lean archive (no T5 to fetch at a cold start), which a bare
    s3:// names apart from the full model's."""
    from schemas import ConvertRequest
    from tests.helpers import generate, hub_cache
    from worker.engine import Engine

    worker = settings.model_copy(update={"hf_hub_cache": hub_cache(tmp_path / "hub", "acme/sd3", sd3_dir,
                                                                   {"main": "3" * 40})})

    def convert(**model):
        request = ConvertRequest.model_validate({"task": "convert", "model": {"id": "acme/sd3"} | model,
                                                 "convert": {"dest_url": "s3://", "precision": "fp32"}})
        return Engine(worker).convert(request, lambda event: None, lambda: False).convert

    full, lean = convert(), convert(t5=False)
    assert full.url == f"s3://{BUCKET}/models--acme--sd3--fp32.tar.zst"
    assert lean.url == f"s3://{BUCKET}/models--acme--sd3--fp32--no-t5.tar.zst"
    t5_bytes = (sd3_dir / "text_encoder_3" / "model.safetensors").stat().st_size
    assert full.size_bytes - lean.size_bytes > 0.8 * t5_bytes
    served = generate(settings.model_copy(update={"models_dir": tmp_path / "fresh"}), {"url": lean.url, "t5": False})
    assert served.images[0].base64 == generate(settings, {"id": str(sd3_dir), "t5": False}).images[0].base64


def test_t5_false_on_a_model_without_t5(run, models_dir):
    from worker.engine import Engine
    from worker.errors import ModelSourceError
    from worker.settings import Settings

    with pytest.raises(ModelSourceError, match=r"^model\.t5: embedded:tiny-sd has no T5 encoder to leave out"):
        run(**BASE, model={"t5": False})
    # The operator's MODEL_T5=false is for the SD3 models among others: the rest load as ever.
    engine = Engine(Settings(models_dir=models_dir, hf_hub_offline=True, model_t5=False))
    request = InferenceRequest.model_validate(BASE)
    assert engine.generate(request, lambda event: None, lambda: False).images


def test_a_vae_of_another_architecture_is_refused(run, sd3_dir, tiny_dir):
    message = refused(run, sd3_dir, vae={"id": str(tiny_dir / "vae")})
    assert message.startswith("vae: does not fit this model")


def test_sd3_converts_to_an_archive_and_serves_from_it(settings, s3, sd3_dir):
    from tests.helpers import convert_and_serve

    direct, served = convert_and_serve(settings, sd3_dir, "sd3/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_sd3_trains_and_the_result_is_usable(settings, s3, sd3_dir, method):
    """Flow-matching training of the transformer, with prior preservation, published and then
    used: a LoRA of transformer layers only, or a whole model as an archive."""
    from tests.helpers import train_then_use

    result, keys, plain, tuned = train_then_use(settings, s3, sd3_dir, method, f"sd3/trained-{method}",
                                                max_train_steps=3)
    assert result["train"]["steps"] == 3 and result["train"]["loss"] > 0
    if method == "lora":
        assert {key.split(".")[0] for key in keys} == {"transformer"}
        for layer in ("to_q", "to_out.0", "add_q_proj", "to_add_out"):  # both streams, in the layout
            assert any(f".attn.{layer}.lora_A." in key for key in keys), layer  # SD3's loader reads
    assert tuned.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("fields, message", [
    ({"train_text_encoder": True}, "train.train_text_encoder: SD3 models train their transformer only here"),
    ({"snr_gamma": 5.0}, "train.snr_gamma: Min-SNR weighting is for diffusion models"),
    ({"resolution": 72}, "train.resolution: must be a multiple of 16 for SD3 models, got 72"),
])
def test_what_sd3_training_does_not_do_is_refused_by_field(settings, s3, sd3_dir, fields, message):
    from tests.helpers import training_refusal

    assert training_refusal(settings, s3, sd3_dir, **fields).startswith(message)

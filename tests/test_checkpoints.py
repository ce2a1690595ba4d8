"""Tier 2: single-file checkpoints in the original SD layout, converted with a model's configs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.fixtures.ldm import write_checkpoint
from tests.helpers import BUCKET, generate, hub_cache
from worker.errors import ModelSourceError


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from builder import tiny_model

    return tiny_model.ensure(tmp_path_factory.mktemp("sd-layout") / "tiny", sd_layout=True)


@pytest.fixture(scope="module")
def files(sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    return {suffix: write_checkpoint(sd_dir, out / f"tiny{suffix}").read_bytes()
            for suffix in (".safetensors", ".ckpt")}


def test_safetensors_checkpoint_over_https_matches_the_source_model(settings, http, files, sd_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    events: list = []
    first = generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors"}, events)
    assert (first.model.id, first.model.source) == (str(sd_dir), "checkpoint")
    assert [e for e in events if e.stage == "download"][-1].step == len(files[".safetensors"])
    again = generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors"})
    assert again.model.source == "cache"  # converted once, a plain load since
    direct = generate(settings, {"id": str(sd_dir)})
    assert first.images[0].base64 == again.images[0].base64 == direct.images[0].base64
    converted = next((settings.models_dir / "checkpoints").iterdir())
    assert {p.suffix for p in converted.rglob("*.*") if p.is_file()} <= {".json", ".safetensors", ".txt"}


def test_ckpt_checkpoint_from_s3_is_read_as_weights_only(settings, s3, files, sd_dir):
    s3.put_object(Bucket=BUCKET, Key="ckpt/tiny.ckpt", Body=files[".ckpt"])
    result = generate(settings, {"id": str(sd_dir), "checkpoint_url": "s3://models/ckpt/tiny.ckpt"})
    direct = generate(settings, {"id": str(sd_dir)})
    assert result.model.source == "checkpoint"
    assert result.images[0].base64 == direct.images[0].base64


class _Payload:
    """Unpickling this runs a command: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_code_is_refused_and_nothing_runs(settings, http, sd_dir, tmp_path):
    marker = tmp_path / "pwned"
    http.files["/evil.ckpt"] = pickle.dumps({"state_dict": {"x": _Payload(marker)}})
    with pytest.raises(ModelSourceError,
                       match=r"^model\.checkpoint_url: refused to load the \.ckpt: it is not plain weights"):
        generate(settings, {"id": str(sd_dir), "checkpoint_url": http.url + "/evil.ckpt"})
    assert not marker.exists()
    assert not (settings.models_dir / "checkpoints").exists()


def test_checkpoint_that_does_not_fit_the_configs_names_the_field(settings, http, files, tiny_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    with pytest.raises(ModelSourceError, match=r"^model\.checkpoint_url: could not convert the checkpoint"):
        generate(settings, {"id": str(tiny_dir), "checkpoint_url": http.url + "/tiny.safetensors"})


def test_a_hub_model_gives_its_configs_without_its_weights(settings, http, files, sd_dir, tmp_path):
    """A checkpoint replaces the weights: from the hub, only the configs are needed."""
    hub = hub_cache(tmp_path / "hub", "acme/sd-base", configs_only(sd_dir, tmp_path), {"main": "9" * 40})
    http.files["/tiny.safetensors"] = files[".safetensors"]
    result = generate(settings.model_copy(update={"hf_hub_cache": hub}),
                      {"id": "acme/sd-base", "checkpoint_url": http.url + "/tiny.safetensors"})
    assert (result.model.id, result.model.source) == ("acme/sd-base", "checkpoint")
    assert result.images[0].base64 == generate(settings, {"id": str(sd_dir)}).images[0].base64


def test_checkpoint_url_from_the_environment(settings, http, files, sd_dir):
    http.files["/tiny.safetensors"] = files[".safetensors"]
    operator = settings.model_copy(update={
        "model_id": str(sd_dir), "checkpoint_url": http.url + "/tiny.safetensors", "allow_private_urls": False,
    })
    assert generate(operator, {}).model.source == "checkpoint"


def configs_only(model_dir, tmp_path):
    """What a hub model gives a checkpoint's conversion: its configs, not its weights."""
    import shutil

    out = tmp_path / f"configs-of-{model_dir.name}"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sdxl_checkpoint_converts_with_its_model_configs(settings, http, sdxl_dir, tmp_path, suffix):
    http.files["/xl" + suffix] = write_checkpoint(sdxl_dir, tmp_path / ("xl" + suffix)).read_bytes()
    result = generate(settings, {"id": str(sdxl_dir), "checkpoint_url": http.url + "/xl" + suffix})
    assert result.model.source == "checkpoint"
    assert result.images[0].base64 == generate(settings, {"id": str(sdxl_dir)}).images[0].base64


@pytest.mark.parametrize("markers, expected", [
    ({"v_pred": None}, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": False}),
    ({"v_pred": None, "ztsnr": None}, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                       "timestep_spacing": "trailing"}),
    ({"ztsnr": None}, {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}),  # (only with v_pred)
])
def test_v_prediction_markers_in_an_sdxl_checkpoint_win_over_the_configs(settings, http, sdxl_dir, tmp_path,
                                                                        markers, expected):
    """NoobAI-XL-style v-prediction fine-tunes carry empty "v_pred" / "ztsnr" tensors, as ComfyUI
    reads them; the configs' model (SDXL base) predicts the noise."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(sdxl_dir, tmp_path / "xl.safetensors")
    save_file(load_file(path) | {name: torch.tensor([]) for name in markers}, path)
    http.files["/marked.safetensors"] = path.read_bytes()
    result = generate(settings, {"id": str(sdxl_dir), "checkpoint_url": http.url + "/marked.safetensors"})
    [converted] = (settings.models_dir / "checkpoints").iterdir()
    config = json.loads(next(converted.rglob("scheduler_config.json")).read_text())
    assert {key: config.get(key, False) for key in expected} == expected
    plain = generate(settings, {"id": str(sdxl_dir)}).images[0].base64
    assert (result.images[0].base64 == plain) == (expected["prediction_type"] == "epsilon")


@pytest.mark.parametrize("kind, reference", [
    ("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_without_model_id_the_checkpoint_layout_picks_the_configs(settings, http, request, tmp_path, kind, reference):
    """A Civitai-style request: just the file. Its keys tell SD 1.x from SDXL, and the configs are
    those of the reference model for that layout (here cached, as on a worker that has run it)."""
    model_dir = request.getfixturevalue(f"{kind}_dir")
    http.files["/finetune.safetensors"] = write_checkpoint(model_dir, tmp_path / "finetune.safetensors").read_bytes()
    hub = hub_cache(tmp_path / "hub", reference, configs_only(model_dir, tmp_path), {"main": "7" * 40})
    worker = settings.model_copy(update={"hf_hub_cache": hub})
    result = generate(worker, {"checkpoint_url": http.url + "/finetune.safetensors"})
    assert (result.model.id, result.model.source) == ("url:finetune.safetensors", "checkpoint")
    assert result.images[0].base64 == generate(settings, {"id": str(model_dir)}).images[0].base64
    again = generate(worker, {"checkpoint_url": http.url + "/finetune.safetensors"})
    assert again.model.source == "cache"


def test_sd3_checkpoint_with_its_text_encoders_converts_with_its_model_configs(settings, http, sd3_dir, tmp_path):
    http.files["/sd3.safetensors"] = write_checkpoint(sd3_dir, tmp_path / "sd3.safetensors").read_bytes()
    result = generate(settings, {"id": str(sd3_dir), "checkpoint_url": http.url + "/sd3.safetensors"})
    assert result.model.source == "checkpoint"
    assert result.images[0].base64 == generate(settings, {"id": str(sd3_dir)}).images[0].base64


def test_sd3_checkpoint_without_text_encoders_takes_them_from_the_reference_model(settings, http, sd3_dir, tmp_path):
    """As Stability ships SD3.5 (and many fine-tunes): MMDiT and VAE only. The reference model
    for the layout lends its configs and its text encoders, not its transformer or VAE."""
    import shutil

    bare = write_checkpoint(sd3_dir, tmp_path / "sd3-bare.safetensors", text_encoders=False)
    http.files["/sd3-bare.safetensors"] = bare.read_bytes()
    lender = tmp_path / "lender"
    shutil.copytree(sd3_dir, lender, ignore=lambda folder, names: [
        n for n in names if n.endswith(".safetensors") and Path(folder).name in ("transformer", "vae")])
    reference = "stabilityai/stable-diffusion-3-medium-diffusers"
    request = {"checkpoint_url": http.url + "/sd3-bare.safetensors"}

    # 1. A worker that has only the reference model's configs cached (and no hub) says what it lacks.
    configs = hub_cache(tmp_path / "configs", reference, configs_only(sd3_dir, tmp_path), {"main": "5" * 40})
    with pytest.raises(ModelSourceError, match=rf"^model\.checkpoint_url: its layout takes the configs of {reference}: "
                       ".* HF_HUB_OFFLINE is set"):
        generate(settings.model_copy(update={"hf_hub_cache": configs}), request)

    # 2. With its text encoders cached too, the checkpoint gives the source model's image.
    hub = hub_cache(tmp_path / "hub", reference, lender, {"main": "6" * 40})
    result = generate(settings.model_copy(update={"hf_hub_cache": hub}), request)
    assert (result.model.id, result.model.source) == ("url:sd3-bare.safetensors", "checkpoint")
    assert result.images[0].base64 == generate(settings, {"id": str(sd3_dir)}).images[0].base64

    # 3. Without T5 (model.t5 false), T5 is neither needed nor fetched: a lender without it will do.
    shutil.rmtree(lender / "text_encoder_3")
    lean_hub = hub_cache(tmp_path / "lean-hub", reference, lender, {"main": "8" * 40})
    lean = generate(settings.model_copy(update={"hf_hub_cache": lean_hub}), request | {"t5": False})
    assert lean.model.source == "checkpoint"
    assert lean.images[0].base64 == generate(settings, {"id": str(sd3_dir), "t5": False}).images[0].base64


def test_sd35_checkpoints_take_their_own_configs(tmp_path):
    import torch
    from safetensors.torch import save_file

    from worker.sources.checkpoints import missing_parts, reference_model

    block = "model.diffusion_model.joint_blocks.{}.x_block.{}.weight"
    medium = tmp_path / "medium.safetensors"  # a second attention in its first blocks
    save_file({block.format(0, "attn.qkv"): torch.zeros(3, 2), block.format(0, "attn2.qkv"): torch.zeros(3, 2)}, medium)
    assert reference_model(medium, "model.checkpoint_url") == "stabilityai/stable-diffusion-3.5-medium"
    large = tmp_path / "large.safetensors"  # 38 blocks
    save_file({block.format(i, "attn.qkv"): torch.zeros(3, 2) for i in range(38)}
              | {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, large)
    assert reference_model(large, "model.checkpoint_url") == "stabilityai/stable-diffusion-3.5-large"
    assert missing_parts(large) == ["text_encoder_2", "text_encoder_3"]


@pytest.mark.parametrize("output_bias, prediction, sample_size", [
    (-2.0, "v_prediction", 12),  # its output far below its input: velocity, SD 2.1's configs kept
    (0.0, "epsilon", 64),  # not: noise, SD 2 base's (512 px)
])
def test_sd2_checkpoints_without_model_id_are_probed_for_what_they_predict(settings, http, tmp_path, output_bias,
                                                                          prediction, sample_size):
    """SD 2.x files do not say whether they predict the noise or the velocity; the wrong guess
    draws noise. The UNet here outputs a constant, which decides AUTOMATIC1111's probe."""
    import json

    from tests.fixtures.sd2 import build_sd2

    model_dir = build_sd2(tmp_path / "sd2", output_bias=output_bias)
    http.files["/sd2.safetensors"] = write_checkpoint(model_dir, tmp_path / "sd2.safetensors").read_bytes()
    hub = hub_cache(tmp_path / "hub", "stabilityai/stable-diffusion-2-1", configs_only(model_dir, tmp_path),
                    {"main": "2" * 40})
    worker = settings.model_copy(update={"hf_hub_cache": hub})

    def converted(models_dir) -> tuple[str, int]:
        [index] = (models_dir / "checkpoints").glob("*/model_index.json")
        scheduler = json.loads((index.parent / "scheduler" / "scheduler_config.json").read_text())
        unet = json.loads((index.parent / "unet" / "config.json").read_text())
        return scheduler["prediction_type"], unet["sample_size"]

    result = generate(worker, {"checkpoint_url": http.url + "/sd2.safetensors"}, size=None)
    assert result.model.source == "checkpoint"
    assert converted(settings.models_dir) == (prediction, sample_size)
    assert result.images[0].width == sample_size * 8  # the model's own size follows
    # With model.id, its configs are the caller's word: no probe.
    named = settings.model_copy(update={"models_dir": tmp_path / "named"})
    generate(named, {"id": str(model_dir), "checkpoint_url": http.url + "/sd2.safetensors"})
    assert converted(named.models_dir) == ("v_prediction", 12)


def test_inpainting_and_refiner_checkpoints_take_their_configs(inpaint_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    from worker.sources.checkpoints import reference_model

    path = write_checkpoint(inpaint_dir, tmp_path / "inpaint.safetensors")
    assert reference_model(path, "model.checkpoint_url") == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    refiner = tmp_path / "refiner.safetensors"  # its keys: a UNet, and OpenCLIP-G as the first embedder
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "conditioner.embedders.0.model.text_projection": torch.zeros(8, 8)}, refiner)
    assert reference_model(refiner, "refiner.checkpoint_url") == "stabilityai/stable-diffusion-xl-refiner-1.0"


def test_a_layout_whose_configs_cannot_be_had_says_which_it_needs(settings, http, files):
    http.files["/finetune.safetensors"] = files[".safetensors"]
    with pytest.raises(ModelSourceError, match=r"^model\.checkpoint_url: its layout takes the configs of "
                       r"stable-diffusion-v1-5/stable-diffusion-v1-5: .* HF_HUB_OFFLINE is set"):
        generate(settings, {"checkpoint_url": http.url + "/finetune.safetensors"})
    assert not list((settings.models_dir / "checkpoints").glob("*/model_index.json"))


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)},
     "is a LoRA, not a model: pass it in loras"),
    ({"vae.decoder.conv_in.weight": (4, 4)}, "is not a Stable Diffusion checkpoint"),
])
def test_a_file_that_is_not_a_model_checkpoint_says_what_it_is(settings, http, tmp_path, keys, message):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "file.safetensors")
    http.files["/file.safetensors"] = (tmp_path / "file.safetensors").read_bytes()
    with pytest.raises(ModelSourceError, match=rf"^model\.checkpoint_url: {message}"):
        generate(settings, {"checkpoint_url": http.url + "/file.safetensors"})


def test_a_flux_transformer_file_takes_the_text_encoders_and_vae_of_its_reference_model(settings, http, flux_dir,
                                                                                     tmp_path):
    """A FLUX.1 transformer as one file (a fine-tune from Civitai): recognised by its keys
    ([dev]: a guidance embedding), converted with the reference model's configs, which lends its
    CLIP, T5 and VAE; the image is the source model's. (This file is in diffusers' layout: the
    converter for Black Forest Labs' layout is exact at FLUX.1's real width only.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(weights, tmp_path / "flux-finetune.safetensors")
    http.files["/flux-finetune.safetensors"] = (tmp_path / "flux-finetune.safetensors").read_bytes()
    lender = tmp_path / "lender"  # the reference model, without a transformer worth the name
    shutil.copytree(flux_dir, lender, ignore=lambda folder, names: [
        n for n in names if n.endswith(".safetensors") and Path(folder).name == "transformer"])
    hub = hub_cache(tmp_path / "hub", "black-forest-labs/FLUX.1-dev", lender, {"main": "9" * 40})
    request = {"checkpoint_url": http.url + "/flux-finetune.safetensors"}
    result = generate(settings.model_copy(update={"hf_hub_cache": hub}), request)
    assert (result.model.id, result.model.source) == ("url:flux-finetune.safetensors", "checkpoint")
    assert result.images[0].base64 == generate(settings, {"id": str(flux_dir)}).images[0].base64
    # With model.id, that model's configs and parts.
    named = generate(settings, {"id": str(flux_dir)} | request)
    assert named.images[0].base64 == result.images[0].base64


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_transformer_files_are_told_apart_by_their_keys(tmp_path, prefix):
    """Black Forest Labs' layout (and Civitai's, with ComfyUI's prefix): [dev] has a guidance
    embedding, [schnell] none; either lacks the text encoders and the VAE."""
    import torch
    from safetensors.torch import save_file

    from worker.sources.checkpoints import missing_parts, reference_model

    block = {f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}
    schnell, dev = tmp_path / "schnell.safetensors", tmp_path / "dev.safetensors"
    save_file(block, schnell)
    save_file(block | {f"{prefix}guidance_in.in_layer.weight": torch.zeros(2, 2)}, dev)
    assert reference_model(dev, "model.checkpoint_url") == "black-forest-labs/FLUX.1-dev"
    assert reference_model(schnell, "model.checkpoint_url") == "black-forest-labs/FLUX.1-schnell"
    assert missing_parts(dev) == ["text_encoder", "text_encoder_2", "vae"]


def test_a_gguf_flux_transformer_runs_quantized_beside_its_models_text_encoders(settings, http, flux_dir, tmp_path):
    """A GGUF-quantized FLUX.1 transformer (Q8_0), as city96 publishes them: installed as it
    is, read with diffusers' GGUF quantizer, its image within Q8_0's error of the source
    model's; a second worker loads it from the cache. Convert refuses it: diffusers cannot save
    GGUF weights as safetensors."""
    import numpy as np

    from tests.fixtures.flux import write_flux_gguf
    from tests.helpers import pixels

    http.files["/flux-Q8_0.gguf"] = write_flux_gguf(flux_dir, tmp_path / "flux-Q8_0.gguf").read_bytes()
    model = {"id": str(flux_dir), "checkpoint_url": http.url + "/flux-Q8_0.gguf"}
    result = generate(settings, model)
    assert result.model.source == "checkpoint"
    [installed] = (settings.models_dir / "checkpoints").glob("*/transformer/transformer.gguf")
    assert not list(installed.parent.glob("*.safetensors"))  # the quantized weights, not a dequantized copy
    assert np.abs(pixels(generate(settings, {"id": str(flux_dir)})) - pixels(result)).max() <= 8
    again = generate(settings.model_copy(update={"max_loaded_models": 1}), model)
    assert (again.model.source, again.images[0].base64) == ("cache", result.images[0].base64)

    from schemas import ConvertRequest
    from worker.engine import Engine

    request = ConvertRequest.model_validate({"task": "convert", "model": model, "convert": {
        "dest_url": f"s3://{BUCKET}/flux-gguf.tar.zst", "precision": "fp32"}})
    with pytest.raises(ModelSourceError, match=r"^convert\.dest_url: the model's transformer is GGUF-quantized"):
        Engine(settings).convert(request, lambda event: None, lambda: False)


def test_gguf_flux_files_are_told_apart_by_their_tensor_names(tmp_path):
    import gguf
    import numpy as np

    from worker.sources.checkpoints import missing_parts, reference_model

    writer = gguf.GGUFWriter(str(tmp_path / "dev.gguf"), "flux")
    for name in ("double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"):
        writer.add_tensor(name, np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert reference_model(tmp_path / "dev.gguf", "model.checkpoint_url") == "black-forest-labs/FLUX.1-dev"
    assert missing_parts(tmp_path / "dev.gguf") == ["text_encoder", "text_encoder_2", "vae"]


def test_a_flux_transformer_in_black_forest_labs_layout_converts_exactly(settings, http, tmp_path):
    """flux1-dev.safetensors' layout (fused q, k, v; Black Forest Labs' names), at FLUX.1's
    real width (diffusers' converter assumes it) with one block of each kind: converted with
    model.id's configs and parts, it draws the source model's image."""
    from tests.fixtures.flux import build_wide_flux, write_bfl_checkpoint

    wide = build_wide_flux(tmp_path / "wide-flux")
    bfl = write_bfl_checkpoint(wide, tmp_path / "bfl.safetensors")
    http.files["/flux1-dev-finetune.safetensors"] = bfl.read_bytes()
    small = settings.model_copy(update={"max_loaded_models": 1})
    converted = generate(small, {"id": str(wide), "checkpoint_url": http.url + "/flux1-dev-finetune.safetensors"})
    assert converted.model.source == "checkpoint"
    assert converted.images[0].base64 == generate(small, {"id": str(wide)}).images[0].base64

"""FLUX.1 LoRA training (diffusers' train_dreambooth_lora_flux.py recipe) on the tiny model,
published and used by a later request; what it refuses; a FLUX.1 model as a published archive."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import convert_and_serve, train_then_use, training_refusal


def test_lora_training_on_flux_publishes_a_lora_a_later_request_uses(settings, s3, flux_dir):
    """train_dreambooth_lora_flux.py's recipe (flow matching on packed latents, [dev]'s guidance
    embedding, prompts encoded once), with prior preservation and mirrored images: a LoRA of
    both streams' attention and feed-forwards, which changes the image of a later request."""
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
    assert training_refusal(settings, s3, flux_dir, **fields).startswith(message)


@pytest.mark.gpu
def test_flux_lora_training_in_mixed_precision_keeps_fp32_lora_weights(settings, s3, flux_dir, monkeypatch):
    """The GPU recipe (bf16 autocast, frozen weights in bf16, LoRA weights in fp32, gradient
    checkpointing), run by the CPU's autocast here; on a GPU machine on CUDA."""
    import worker.train.loop
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


def test_flux_converts_to_an_archive_and_serves_from_it(settings, s3, flux_dir):
    """task convert publishes a FLUX.1 model as a safetensors archive; a fresh worker with an
    empty cache serves the same image from it."""
    direct, served = convert_and_serve(settings, flux_dir, "flux/tiny.tar.zst")
    assert served.model.source == "url" and served.images[0].base64 == direct.images[0].base64

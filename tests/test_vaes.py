"""Another VAE per request (``vae``, worker/vaes.py): A1111's "SD VAE"."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.ldm import vae_to_original
from tests.helpers import RangeServer, hub_cache, png_b64
from worker.errors import ModelSourceError, UserInputError

BASE = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 8}


@pytest.fixture(scope="module")
def other_vae(tiny_dir, tmp_path_factory):
    """The tiny model's VAE architecture with other weights: a fine-tuned VAE."""
    from diffusers import AutoencoderKL

    out = tmp_path_factory.mktemp("vaes") / "ft-vae"
    torch.manual_seed(1)
    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(out, safe_serialization=True)
    return out


def draw(run, **fields) -> str:
    return run(**(BASE | fields))[0].images[0].base64


def test_a_request_vae_replaces_the_models_for_that_request_only(run, tiny_dir, other_vae):
    plain = draw(run)
    swapped, _ = run(**BASE, vae={"id": str(other_vae)})
    assert swapped.images[0].base64 != plain and "vae" in swapped.timings
    again, _ = run(**BASE, vae={"id": str(other_vae)})
    assert again.images[0].base64 == swapped.images[0].base64 and "vae" not in again.timings  # warm
    assert draw(run) == plain  # the model's own VAE for the next request
    assert draw(run, vae={"id": str(tiny_dir / "vae")}) == plain  # the model's own VAE, named: the same image
    assert draw(run, image=png_b64(), vae={"id": str(other_vae)}) != draw(run, image=png_b64())  # encodes too


def test_single_file_vaes_in_either_layout(run, other_vae, tmp_path):
    from safetensors.torch import load_file

    expected = draw(run, vae={"id": str(other_vae)})
    original = vae_to_original(other_vae)
    save_file(original, tmp_path / "vae-ft.safetensors")  # as vae-ft-mse-840000-ema-pruned.safetensors is
    save_file(load_file(other_vae / "diffusion_pytorch_model.safetensors"), tmp_path / "diffusers.safetensors")
    server = RangeServer({"/vae-ft.safetensors": (tmp_path / "vae-ft.safetensors").read_bytes()})
    try:
        assert draw(run, vae={"url": server.url + "/vae-ft.safetensors"}) == expected
    finally:
        server.close()
    assert draw(run, vae={"id": str(tmp_path / "diffusers.safetensors")}) == expected


def test_hub_vaes_and_ones_that_do_not_fit(run, settings, other_vae, tmp_path):
    from schemas import InferenceRequest
    from worker.engine import Engine

    hub = hub_cache(tmp_path / "hub", "acme/ft-vae", other_vae, {"main": "3" * 40})
    engine = Engine(settings.model_copy(update={"hf_hub_cache": hub}))

    def on(engine, **fields):
        return engine.generate(InferenceRequest.model_validate(BASE | fields), lambda _: None, lambda: False)

    assert on(engine, vae={"id": "acme/ft-vae"}).images[0].base64 == draw(run, vae={"id": str(other_vae)})
    with pytest.raises(ModelSourceError, match=r"^vae\.id: acme/none is not cached on this worker"):
        on(engine, vae={"id": "acme/none"})
    with pytest.raises(ModelSourceError, match=r"^vae\.id: /nowhere is not a diffusers VAE \(config\.json missing\)"):
        on(engine, vae={"id": "/nowhere"})
    # Four latent channels either way, but another scaling factor: a VAE for another family.
    from diffusers import AutoencoderKL

    alien = AutoencoderKL.from_pretrained(other_vae)
    alien.register_to_config(scaling_factor=0.13025)
    alien.save_pretrained(tmp_path / "alien", safe_serialization=True)
    with pytest.raises(UserInputError, match=r"^vae: does not fit this model .*scaling_factor is 0\.13025"):
        on(engine, vae={"id": str(tmp_path / "alien")})
    assert on(engine).images[0].base64 == draw(run)  # carries on, plain

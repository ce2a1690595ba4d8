"""COMPILE, QUANTIZE and the step cache as a caller and an operator see them: a compiled job
draws the eager image, a second worker on the same MODELS_DIR loads the kernels instead of
compiling, a compile that fails leaves the job eager; the endpoint's step cache, reported, and
off for the request that says so; quantized DiT denoisers that run, report themselves and take
LoRAs. (How much faster each is: bench/speed.py.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from schemas import CacheSpec
from tests.helpers import ROOT, assert_images_close, decode, worker_env

# One job in a fresh process (a worker of the endpoint): its result, and what Inductor did.
PROBE = r"""
import json, sys
from torch._dynamo.utils import counters
from schemas import parse_request
from worker.engine import Engine
from worker.settings import Settings

settings = Settings()
engine = Engine(settings)
engine.warm_up()
warm = dict(counters["inductor"])
result = engine.generate(parse_request(json.loads(sys.argv[1]), settings.limits), lambda _: None, lambda: False)
print(json.dumps({"result": result.dump(), "warm_up": warm, "after": dict(counters["inductor"])}))
"""

JOB = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 7}  # the embedded model's own size
SIZE = {"width": 64, "height": 64}


def probe(models_dir, job: dict = JOB, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(job)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=worker_env(models_dir, DEVICE="cpu", **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"log": done.stderr}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> dict:
    """Two workers of one endpoint with COMPILE=regional and the embedded model, one after the
    other on the same MODELS_DIR: each one's job, and the kernels' folder they share."""
    models_dir = tmp_path_factory.mktemp("endpoint")
    first = probe(models_dir, COMPILE="regional")
    return {"first": first, "second": probe(models_dir, COMPILE="regional"),
            "kernels": list((models_dir / "compile").iterdir())}


def test_compiled_jobs_draw_the_eager_image_and_a_second_worker_loads_the_kernels(run, endpoint):
    """COMPILE=regional: the warm-up compiles the default model's own size (the first job finds
    it compiled), and the kernels stay in MODELS_DIR/compile, where the next worker finds them."""
    eager, _ = run(**JOB)
    first, second = endpoint["first"], endpoint["second"]
    assert first["result"]["model"]["compile"] == "full"  # (regional compiles a UNet whole)
    assert first["warm_up"].get("fxgraph_cache_miss", 0) >= 1  # compiled at start-up ...
    assert first["after"] == first["warm_up"]  # ... and the job compiled nothing more
    assert_images_close(decode(eager.images[0].base64), decode(first["result"]["images"][0]["base64"]),
                        "compiled", tolerance=2)
    [kernels] = endpoint["kernels"]
    assert kernels.name.startswith("torch-2.") and kernels.name.endswith("-cpu-x86_64")

    assert second["warm_up"].get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in second["warm_up"]
    assert second["result"]["images"] == first["result"]["images"]


def test_without_a_compiler_the_worker_runs_eagerly_and_says_why_once(run, settings, caplog):
    """No working C++ compiler: the worker does not try (a model would spend its first image
    lowering a graph for nothing); its jobs draw the eager image and say nothing of compiling;
    the log says why once, without a traceback."""
    import torch._inductor.config

    from worker.engine import Engine

    eager, _ = run(**JOB)
    # (What CXX sets; torch's own patch: pytest's monkeypatch deletes a config entry on undo.)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/c++")}), caplog.at_level(logging.INFO):
        endpoint = Engine(settings.model_copy(update={"compile": "regional"}))
        jobs = [draw(endpoint, **JOB) for _ in range(2)]
    said = [record for record in caplog.records if "COMPILE" in record.getMessage()]
    assert [record.getMessage() for record in said] == [
        "COMPILE=regional is not used, the denoiser runs eagerly: No working C++ compiler found in "
        "torch._inductor.config.cpp.cxx: (None, '/nonexistent/c++')"]
    assert said[0].exc_info is None and not (settings.models_dir / "compile").exists()
    for job in jobs:
        assert job.model.compile is None
        assert_images_close(decode(eager.images[0].base64), decode(job.images[0].base64), "eager", tolerance=0)


# A C++ compiler that answers --version and fails to build anything (a broken toolchain).
BROKEN_CXX = """#!/bin/sh
[ "$1" = --version ] && exec g++ --version
echo "cc1plus: fatal error: out of memory" >&2
exit 1
"""


def test_a_compile_failing_under_a_cache_hook_leaves_the_job_eager_with_one_log_line(flux_dir, tmp_path):
    """The blocks a first_block hook computes fail to compile (the compiler fails): the job
    still answers, eagerly, and the log says so once, not once per block."""
    job = dict(prompt="a lighthouse", seed=3, num_inference_steps=4, model={"id": str(flux_dir)}, **SIZE,
               cache={"method": "first_block", "threshold": 0.5})
    broken = tmp_path / "c++"
    broken.write_text(BROKEN_CXX)
    broken.chmod(0o755)
    done = probe(tmp_path, job, COMPILE="regional", CXX=str(broken))
    assert "compile" not in done["result"]["model"] and done["result"]["cache"]["approximated"] > 0
    assert done["log"].count(f"COMPILE=regional failed for {flux_dir}, which runs eagerly from now on") == 1


# --- Step caching: the endpoint's default, and what the answer says of it ---


def draw(engine, **fields):
    from schemas import InferenceRequest

    return engine.generate(InferenceRequest.model_validate(fields), lambda _: None, lambda: False)


def test_the_endpoints_cache_applies_where_a_request_leaves_it_out(settings, flux_dir):
    from worker.engine import Engine

    plain_endpoint = Engine(settings)
    cached_endpoint = Engine(settings.model_copy(update={"cache": CacheSpec(method="first_block", threshold=0.5)}))
    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=8, model={"id": str(flux_dir)}, **SIZE)
    plain = draw(plain_endpoint, **fields)
    assert plain.cache is None
    cached = draw(cached_endpoint, **fields)
    assert cached.cache.method == "first_block" and cached.cache.passes == 8 and 0 < cached.cache.approximated < 8
    assert cached.images[0].base64 != plain.images[0].base64
    off = draw(cached_endpoint, **fields, cache=False)  # a request may say no
    assert off.cache is None and off.images[0].base64 == plain.images[0].base64
    # Where the model's denoiser has no cache hooks, the endpoint's default does not apply (nor fail).
    sd = draw(cached_endpoint, prompt="p", num_inference_steps=2)
    assert sd.cache is None and sd.images


def test_a_cached_job_on_a_compiled_model_computes_compiled_and_leaves_it_as_it_was(settings, flux_dir):
    """COMPILE with a step cache: where the cache's hooks wrap whole blocks (first_block), the
    blocks compute compiled under them, drawing the eager cached image; where they wrap parts of
    blocks (TaylorSeer's attention layers), the job runs eagerly and says so; the next plain job
    is the compiled one bit for bit."""
    from worker.engine import Engine

    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=8, model={"id": str(flux_dir)}, **SIZE)
    first_block = {"method": "first_block", "threshold": 0.5}
    eager_cached = draw(Engine(settings), **fields, cache=first_block)
    compiled_endpoint = Engine(settings.model_copy(update={"compile": "regional"}))
    plain = draw(compiled_endpoint, **fields)
    cached = draw(compiled_endpoint, **fields, cache=first_block)
    assert cached.model.compile == "regional" and cached.cache.approximated == eager_cached.cache.approximated > 0
    assert_images_close(decode(eager_cached.images[0].base64), decode(cached.images[0].base64), "compiled-cached",
                        tolerance=2)
    taylor = draw(compiled_endpoint, **fields, cache={"method": "taylorseer", "interval": 2})
    assert taylor.model.compile is None and taylor.cache.approximated > 0
    again = draw(compiled_endpoint, **fields)
    assert again.model.compile == "regional" and again.images[0].base64 == plain.images[0].base64
    blocks = compiled_endpoint.models.loaded()[0].pipeline.transformer.transformer_blocks
    assert all(block.forward == type(block).forward.__get__(block) for block in blocks)  # no wrapper left behind


def test_a_compiled_unet_is_compiled_whole_and_fuses_its_attention_but_for_loras(settings, tiny_dir, tmp_path,
                                                                                 endpoint, monkeypatch):
    """COMPILE on a UNet model: q, k and v in one matmul (close to the eager image); a job with a
    LoRA runs the separate projections its layers wrap, drawing the eager LoRA image; the plain
    model after it is fused again, the same image as before."""
    from tests.fixtures.lora_files import make_lora
    from worker.engine import Engine

    # (A worker of the endpoint above: the plain model's kernels are there; the LoRA's compile.)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(endpoint["kernels"][0]))

    lora = [{"id": str(make_lora(tiny_dir, tmp_path / "style.safetensors", seed=1)), "scale": 1.0}]
    fields = dict(prompt="a lighthouse", seed=5, num_inference_steps=2)
    eager_endpoint = Engine(settings)
    eager, eager_lora = draw(eager_endpoint, **fields), draw(eager_endpoint, **fields, loras=lora)
    compiled_endpoint = Engine(settings.model_copy(update={"compile": "regional"}))
    plain = draw(compiled_endpoint, **fields)
    unet = compiled_endpoint.models.loaded()[0].pipeline.unet
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert plain.model.compile == "full"  # (regional compiles a UNet whole)
    assert_images_close(decode(eager.images[0].base64), decode(plain.images[0].base64), "fused", tolerance=2)
    styled = draw(compiled_endpoint, **fields, loras=lora)
    # (Compiled, this tiny random UNet's output with the LoRA differs from eager's by 2-4e-4,
    # which each step amplifies chaotically (a mean pixel gap of 2.6 after two steps, 18 after
    # three, while the LoRA moves the image by 35): the image is the eager LoRA image's, far
    # closer to it than to the plain one.)
    [a, b, c] = [np.asarray(decode(r.images[0].base64), dtype=float) for r in (eager, eager_lora, styled)]
    assert np.abs(c - b).mean() < np.abs(c - a).mean() / 3
    # Another scale runs the kernels compiled for the first (the scales are the graph's inputs):
    # nothing compiles again, and the image is the eager one at that scale.
    from torch._dynamo.utils import counters

    half = [{**lora[0], "scale": 0.5}]
    eager_half = np.asarray(decode(draw(eager_endpoint, **fields, loras=half).images[0].base64), dtype=float)
    graphs = dict(counters["stats"])
    styled_half = np.asarray(decode(draw(compiled_endpoint, **fields, loras=half).images[0].base64), dtype=float)
    assert dict(counters["stats"]) == graphs
    assert np.abs(styled_half - eager_half).mean() < np.abs(styled_half - b).mean() / 3
    assert draw(compiled_endpoint, **fields).images[0].base64 == plain.images[0].base64


# --- QUANTIZE ---

def test_int8_quantized_flux_runs_reports_itself_and_takes_loras(settings, flux_dir, tmp_path):
    """QUANTIZE=int8: the transformer's linear layers in int8, once at load; close to the bf16 /
    fp32 image; a LoRA on top for one request, gone after. fp8 on a machine without fp8 is int8."""
    from tests.fixtures.flux import make_flux_lora
    from worker.engine import Engine

    lora = make_flux_lora(flux_dir, tmp_path / "flux-lora.safetensors")
    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=4, model={"id": str(flux_dir)}, **SIZE)
    plain = draw(Engine(settings), **fields)
    quantized_endpoint = Engine(settings.model_copy(update={"quantize": "fp8"}))
    quantized = draw(quantized_endpoint, **fields)
    assert quantized.model.quantize == "int8"  # (this CPU has no fp8 matrix multiply)
    transformer = quantized_endpoint.models.loaded()[0].pipeline.transformer
    assert type(transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    assert_images_close(decode(plain.images[0].base64), decode(quantized.images[0].base64), "int8", tolerance=8)
    styled = draw(quantized_endpoint, **fields, loras=[{"id": str(lora), "scale": 0.8}])
    assert styled.images[0].base64 != quantized.images[0].base64
    assert draw(quantized_endpoint, **fields).images[0].base64 == quantized.images[0].base64


def test_quantize_leaves_unet_models_as_they_are(settings):
    from worker.engine import Engine

    result = draw(Engine(settings.model_copy(update={"quantize": "int8"})), prompt="p", num_inference_steps=2)
    assert result.model.quantize is None and result.images


# --- On CUDA (pytest -m gpu on a GPU machine; skipped elsewhere) ---

@pytest.mark.gpu
def test_compile_fp8_and_a_cache_on_cuda(settings, flux_dir, tiny_dir):
    """CUDA's defaults: COMPILE regional (Triton kernels), QUANTIZE=fp8 where the GPU has it,
    a step cache computing compiled; each close to the eager image. A UNet compiled whole,
    fused and channels-last, in fp16."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from worker.engine import Engine

    def psnr(a, b) -> float:
        a, b = (np.asarray(decode(r.images[0].base64), dtype=float) for r in (a, b))
        return float(10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-9)))

    cuda = settings.model_copy(update={"device": "cuda"})
    fields = dict(prompt="a lighthouse", seed=3, num_inference_steps=8, model={"id": str(flux_dir)}, **SIZE)
    eager = draw(Engine(cuda.model_copy(update={"compile": "off"})), **fields)
    fast_endpoint = Engine(cuda.model_copy(update={"quantize": "fp8"}))
    fast = draw(fast_endpoint, **fields)
    has_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    assert (fast.model.compile, fast.model.quantize) == ("regional", "fp8" if has_fp8 else "int8")
    assert psnr(eager, fast) > 20
    cached = draw(fast_endpoint, **fields, cache={"method": "first_block", "threshold": 0.5})
    assert cached.model.compile == "regional" and 0 < cached.cache.approximated < 8
    assert draw(fast_endpoint, **fields).images[0].base64 == fast.images[0].base64

    sd = dict(prompt="a lighthouse", seed=5, num_inference_steps=3)
    sd_eager = draw(Engine(cuda.model_copy(update={"compile": "off"})), **sd)
    sd_endpoint = Engine(cuda)
    sd_fast = draw(sd_endpoint, **sd)
    assert (sd_fast.model.compile, sd_fast.model.precision) == ("full", "fp16")
    unet = sd_endpoint.models.loaded()[0].pipeline.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert psnr(sd_eager, sd_fast) > 30

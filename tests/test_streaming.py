"""Cold starts: a model's archive starts fetching as its job is read, and loads while it arrives.

Each test fetches a real archive over HTTP on loopback (the Range server) into a fresh
MODELS_DIR. A pipeline loaded while its archive arrived draws exactly what the same model draws
when loaded from the installed directory by ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import zstandard

from tests.helpers import at_once, generate, pack
from worker.sources.publish import pack as converter_pack


def _image(result) -> np.ndarray:
    from tests.helpers import decode

    return np.asarray(decode(result.images[0].base64))


def _converter_archive(model_dir, tmp_path) -> bytes:
    out = tmp_path / "model.tar.zst"
    converter_pack(model_dir, out, "zstd")
    return out.read_bytes()


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_sd_loaded_while_it_arrives_draws_what_from_pretrained_draws(settings, http, tiny_dir, tmp_path, caplog,
                                                                     precision):
    """fp32 as stored, and converted to bf16 tensor by tensor as the bytes land."""
    http.files["/tiny.tar.zst"] = _converter_archive(tiny_dir, tmp_path)
    model = {"url": http.url + "/tiny.tar.zst"} | ({"precision": precision} if precision else {})
    events: list = []
    with caplog.at_level(logging.INFO, logger="worker.sources.streaming"):
        streamed = generate(settings, model, events)
    assert streamed.model.source == "url"
    assert "loaded text_encoder, unet, vae while the archive arrived" in caplog.text
    assert any(e.stage == "download" for e in events)
    assert set(streamed.timings) >= {"download", "load"}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.sources.streaming"):
        from_disk = generate(settings, model)  # a new worker: the installed directory, from_pretrained
    assert from_disk.model.source == "cache" and "while the archive arrived" not in caplog.text
    assert np.array_equal(_image(streamed), _image(from_disk))


def test_flux_loaded_while_it_arrives_draws_what_from_pretrained_draws(settings, http, flux_dir, tmp_path, caplog):
    """Two text encoders (CLIP, T5 with its fp32 feed-forward outputs) and a transformer, in bf16."""
    http.files["/flux.tar.zst"] = _converter_archive(flux_dir, tmp_path)
    model = {"url": http.url + "/flux.tar.zst", "precision": "bf16"}
    with caplog.at_level(logging.INFO, logger="worker.sources.streaming"):
        streamed = generate(settings, model)
    assert "text_encoder, text_encoder_2, transformer, vae while the archive arrived" in caplog.text
    from_disk = generate(settings, model)
    assert from_disk.model.source == "cache"
    assert np.array_equal(_image(streamed), _image(from_disk))


def test_an_archive_with_its_index_last_draws_the_same(settings, http, tiny_dir):
    """Archives from other tools need not put model_index.json first (the weights are read once it lands)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        paths = sorted(tiny_dir.rglob("*"), key=lambda p: p.name == "model_index.json")
        for path in paths:
            tar.add(path, arcname=path.relative_to(tiny_dir).as_posix(), recursive=False)
    http.files["/last.tar.zst"] = zstandard.ZstdCompressor().compress(buffer.getvalue())
    http.files["/first.tar.zst"] = pack(tiny_dir, folder=None)
    late = generate(settings, {"url": http.url + "/last.tar.zst"})
    assert late.model.source == "url"
    assert np.array_equal(_image(late), _image(generate(settings, {"url": http.url + "/first.tar.zst"})))


def test_jobs_arriving_during_a_fetch_wait_for_the_one_fetch(settings, http, tiny_dir):
    """Two jobs for one archive at once, in one worker: one download, both answered."""
    from schemas import InferenceRequest, ModelSpec
    from worker.engine import Engine
    from worker.sources import fetches
    from worker.sources.locate import prefetch

    http.files["/tiny.tar.zst"] = pack(tiny_dir)
    model = {"url": http.url + "/tiny.tar.zst"}
    assert isinstance(prefetch(ModelSpec(**model), settings), fetches.Fetch)  # as the job is read, before the engine
    engine = Engine(settings)
    request = InferenceRequest.model_validate({"prompt": "p", "num_inference_steps": 2, "seed": 4, "model": model})
    results = at_once(lambda: engine.generate(request, lambda e: None, lambda: False))
    assert sorted(r.model.source for r in results) == ["memory", "url"]
    assert [r for _, r in http.requests].count(f"bytes=0-{2**20 - 1}") == 1  # fetched once


def test_a_fresh_worker_process_fetches_while_it_imports_and_says_where_time_went(http, tiny_dir,
                                                                                              tmp_path):
    """``python handler.py --test_input`` naming an archive: fetched (in a process of its own) while the
    worker imports, and the job's timings show the start-up it waited for, the download, the load after
    the last byte and the image. (So small an archive has landed whole before the imports end.)"""
    import ast
    import json
    import re
    import subprocess
    import sys

    from tests.helpers import ROOT, worker_env

    http.files["/tiny.tar.zst"] = _converter_archive(tiny_dir, tmp_path)
    job = {"input": {"prompt": "p", "num_inference_steps": 1, "width": 64, "height": 64,
                     "model": {"url": http.url + "/tiny.tar.zst"}}}
    done = subprocess.run([sys.executable, str(ROOT / "handler.py"), "--test_input", json.dumps(job)], cwd=tmp_path,
                          env=worker_env(tmp_path / "models", ALLOW_PRIVATE_URLS="1"), capture_output=True, text=True,
                          timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "'source': 'url'" in output
    timings = ast.literal_eval(re.search(r"'timings': (\{[^}]*\})", output).group(1))
    assert {"startup", "download", "load", "inference"} <= set(timings)
    assert (tmp_path / "output" / "local_test-0.png").is_file()


def test_while_a_worker_starts_its_fetch_runs_in_a_process_of_its_own(settings, http, tiny_dir, tmp_path,
                                                                      monkeypatch):
    """(Beside the imports, a fetching thread would starve.) Its files, progress and errors cross over."""
    from worker.errors import ModelSourceError
    from worker.sources import fetches

    monkeypatch.setattr(fetches, "still_starting", lambda: True)
    http.files["/tiny.tar.zst"] = _converter_archive(tiny_dir, tmp_path)
    events: list = []
    result = generate(settings, {"url": http.url + "/tiny.tar.zst"}, events)
    assert result.model.source == "url" and any(e.stage == "download" for e in events)
    with pytest.raises(ModelSourceError, match=r"^model\.url: .*/missing\.tar\.zst: HTTP 404$"):
        generate(settings, {"url": http.url + "/missing.tar.zst"})


def test_a_model_warm_in_memory_is_not_fetched_again_when_its_job_is_read(settings, http, tiny_dir):
    """Its archive gone from MODELS_DIR (the disk budget evicted it): the next job for it is
    read without starting a download it would not use, and is answered from memory."""
    import shutil

    from schemas import parse_request
    from worker.jobs import JobRunner

    http.files["/tiny.tar.zst"] = pack(tiny_dir)
    job = {"prompt": "p", "num_inference_steps": 2, "seed": 4, "model": {"url": http.url + "/tiny.tar.zst"}}
    runner = JobRunner(settings, sdk_config={})
    request = parse_request(job, settings.limits)
    runner._prefetch(request)
    assert runner.engine().generate(request, lambda e: None, lambda: False).model.source == "url"
    shutil.rmtree(settings.models_dir / "archives")
    asked = len(http.requests)
    runner._prefetch(request)
    assert runner.engine().generate(request, lambda e: None, lambda: False).model.source == "memory"
    assert len(http.requests) == asked

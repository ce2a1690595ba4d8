"""Tier 2: the job edge (worker.jobs, worker.errors): answers, cancellation, fresh workers."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from tests.helpers import stream
from worker.errors import UserInputError, answer_for, redact
from worker.jobs import JobRunner
from worker.settings import Settings

VALID = {"prompt": "p", "num_inference_steps": 2, "seed": 1}


def collect(runner: JobRunner, job_input, job_id="job-1") -> list[dict]:
    return stream(runner, {"id": job_id, "input": job_input})


def test_stream_yields_progress_only_when_asked(runner):
    quiet = collect(runner, VALID)
    assert [item["type"] for item in quiet] == ["result"]
    loud = collect(runner, VALID | {"stream": True})
    assert loud[-1]["type"] == "result" and {i["type"] for i in loud[:-1]} == {"progress"}


def uncapped(engine) -> JobRunner:
    """A runner on the warm engine whose MAX_STEPS lets a job run 900 steps."""
    return JobRunner(engine.settings.model_copy(update={"max_steps": 1000}), sdk_config={}, engine=engine)


def test_cancelled_job_stops_denoising_and_the_next_job_runs(engine, caplog):
    runner = uncapped(engine)
    caplog.set_level(logging.INFO, logger="worker.jobs")

    async def go():
        seen = asyncio.Event()

        async def consume():
            async for item in runner.stream({"id": "long", "input": VALID | {"num_inference_steps": 900,
                                                                             "scheduler": "DDIM", "stream": True}}):
                if item.get("stage") == "inference":
                    seen.set()
            raise AssertionError(f"the long job ended before it was cancelled: {item}")

        task = asyncio.create_task(consume())  # the SDK cancels the task that iterates the handler
        await asyncio.wait_for(seen.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [item async for item in runner.stream({"id": "next", "input": VALID})]

    after = asyncio.run(go())
    assert after[-1]["type"] == "result"
    [line] = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    step = int(line.split("cancelled at step ")[1].split()[0])
    assert step < 100, line  # stopped long before its 900 steps


class OutOfMemoryEngine:
    """Stands in for a GPU running out of memory, which a CPU-only machine cannot do for real."""

    def generate(self, request, emit, cancelled, outbox=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_answers_then_asks_for_a_fresh_worker(engine):
    config: dict = {}
    runner = JobRunner(engine.settings, sdk_config=config, engine=OutOfMemoryEngine())
    [answer] = collect(runner, VALID)
    assert answer == {"error": "device: out of GPU memory; lower width, height or num_images"}
    assert config["refresh_worker"] is True  # the SDK stops this pod after the job


def test_steps_beyond_the_schedulers_training_range_are_refused(engine):
    [answer] = collect(uncapped(engine), VALID | {"num_inference_steps": 1000, "scheduler": "DDIM"})
    assert answer == {"error": "num_inference_steps: must be below 1000 for this model's scheduler, got 1000"}


def test_user_errors_do_not_ask_for_a_fresh_worker(runner):
    [answer] = collect(runner, VALID | {"width": 7})
    assert answer["error"].startswith("width: ")
    assert "refresh_worker" not in runner.sdk_config


def test_docker_diffusers_api_clients_read_every_error_in_their_own_field_names(runner):
    """The engine's refusals too, not just validation's: callInputs.MODEL_ID, not model.id."""
    legacy = {"callInputs": {"MODEL_ID": "acme/not-here"}, "modelInputs": {"prompt": "p", "num_inference_steps": 2}}
    [answer] = collect(runner, legacy)
    assert answer["error"] == ("callInputs.MODEL_ID: acme/not-here is not cached on this worker and HF_HUB_OFFLINE "
                               "is set"), answer
    for theirs in ("init_image", "image"):
        inputs = {"prompt": "p", "num_inference_steps": 2, theirs: "bm90IGFuIGltYWdl"}
        [answer] = collect(runner, {"modelInputs": inputs})
        assert answer["error"] == f"modelInputs.{theirs}: is not a readable image (send PNG, JPEG or WebP)"
    [answer] = collect(runner, {"prompt": "p", "num_inference_steps": 2, "image": "bm90IGFuIGltYWdl"})
    assert answer["error"].startswith("image: is not a readable image")  # our own clients: our names


def test_internal_errors_hide_details_and_secrets(caplog):
    settings = Settings(hf_token="hf_supersecretvalue123")
    message, refresh = answer_for(KeyError("hf_supersecretvalue123 in /opt/thing"), settings.secrets())
    assert message == "internal: the worker failed (KeyError); the operator's logs have details"
    assert not refresh
    assert "hf_supersecretvalue123" not in caplog.text and "***" in caplog.text


def test_redact_removes_credentials():
    text = "fetch https://user:pass@host/a.png?X-Amz-Signature=abc failed with token hf_abcdef"
    cleaned = redact(text, ["hf_abcdef"])
    assert cleaned == "fetch https://***@host/a.png?*** failed with token ***"
    message, _ = answer_for(UserInputError("image", "bad https://u:p@h/x?sig=1"))
    assert message == "image: bad https://***@h/x?***"

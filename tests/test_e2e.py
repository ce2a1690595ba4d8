"""Tier 3: the worker as RunPod runs it, through the real runpod SDK in a subprocess.

- the SDK's local API server (``--rp_serve_api``): /runsync, /run + /status, /run + /stream;
- the SDK's production job loop, driven by a local job server (tests/jobserver.py);
- ``python handler.py`` with test_input.json and ``--test_input``, and their exit codes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.jobserver import JobServer
from tests.helpers import ROOT, ApiServer, decode, png_b64, worker_env

VALID = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 11}


def assert_valid_result(result: dict, n: int = 1) -> None:
    assert result["type"] == "result", result
    assert len(result["images"]) == n
    for image in result["images"]:
        assert decode(image["base64"]).size == (image["width"], image["height"]) == (64, 64)
    assert result["timings"]["total_ms"] > 0 and "inference" in result["timings"]
    assert result["model"]["source"] in ("embedded", "memory")


@pytest.fixture(scope="module")
def api(models_dir, tmp_path_factory):
    server = ApiServer(worker_env(models_dir), tmp_path_factory.mktemp("logs") / "api.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_api(models_dir, tmp_path_factory):
    server = ApiServer(worker_env(models_dir, STREAMING="false"), tmp_path_factory.mktemp("logs") / "plain.log")
    yield server
    server.close()


# --- Local API server, streaming handler (the default) ---

def test_runsync_returns_the_result_alone_without_stream(api):
    answer = api.runsync(VALID)
    assert answer["status"] == "COMPLETED"
    [result] = answer["output"]
    assert_valid_result(result)
    assert result["images"][0]["seed"] == 11


def test_runsync_with_stream_yields_every_step_then_the_result(api):
    output = api.runsync(VALID | {"stream": True, "scheduler": "DDIM"})["output"]
    assert all("type" in item for item in output)
    *progress, result = output
    assert [p["step"] for p in progress if p["stage"] == "inference"] == [1, 2, 3]
    assert {p["type"] for p in progress} == {"progress"}
    assert_valid_result(result)


def test_a_hires_job_with_a_long_weighted_prompt_streams_both_passes(api):
    prompt = "(a lighthouse:1.2) on a cliff at dawn, " * 4 + "BREAK oil painting"
    output = api.runsync(VALID | {"stream": True, "scheduler": "DDIM", "prompt": prompt,
                                  "hires": {"scale": 1.5, "strength": 0.7, "upscaler": "lanczos"}})["output"]
    *progress, result = output
    assert [p["step"] for p in progress if p["stage"] == "inference"] == [1, 2, 3]
    assert [p["step"] for p in progress if p["stage"] == "hires"] == [1, 2]  # 3 steps at strength 0.7
    assert result["type"] == "result" and result["timings"]["hires"] > 0
    assert [(i["width"], i["height"]) for i in result["images"]] == [(96, 96)]
    assert decode(result["images"][0]["base64"]).size == (96, 96)


def test_same_request_same_image_across_calls(api):
    first = api.runsync(VALID)["output"][-1]["images"][0]["base64"]
    second = api.runsync(VALID)["output"][-1]["images"][0]["base64"]
    assert first == second


def test_run_then_status(api):
    job = api.post("/run", {"input": VALID | {"num_images": 2}})
    answer = api.post(f"/status/{job['id']}")
    assert answer["status"] == "COMPLETED"
    assert_valid_result(answer["output"][-1], n=2)


def test_run_then_stream(api):
    job = api.post("/run", {"input": VALID | {"stream": True}})
    answer = api.post(f"/stream/{job['id']}")
    outputs = [chunk["output"] for chunk in answer["stream"]]
    assert [o["type"] for o in outputs].count("result") == 1 and outputs[-1]["type"] == "result"
    assert len([o for o in outputs if o.get("stage") == "inference"]) >= 3
    assert_valid_result(outputs[-1])


def test_img2img_and_inpaint_through_the_api(api):
    img2img = api.runsync({"prompt": "p", "image": png_b64(), "num_inference_steps": 4})["output"][-1]
    inpaint = api.runsync({"prompt": "p", "image": png_b64(), "mask_image": png_b64(), "num_inference_steps": 4})
    assert img2img["task"] == "img2img" and inpaint["output"][-1]["task"] == "inpaint"


# At least 15 bad inputs: each answer names the field, and the worker serves the next job.
BAD_INPUTS = [
    ({"prompt": "p", "width": 513}, "width: must be a multiple of 8, got 513"),
    ({"prompt": "p", "height": 8}, "height: "),
    ({"prompt": "p", "num_inference_steps": 0}, "num_inference_steps: "),
    ({"prompt": "p", "num_inference_steps": 151}, "num_inference_steps: at most 150"),
    ({"prompt": "p", "num_images": 9}, "num_images: at most 8"),
    ({"prompt": "p", "guidance_scale": -1}, "guidance_scale: "),
    ({"prompt": "p", "seed": "lucky"}, "seed: "),
    ({"prompt": "p", "scheduler": "Warp"}, "scheduler: must be one of"),
    ({"prompt": "p", "colour": "red"}, "colour: unknown field"),
    ({"negative_prompt": "x"}, "prompt: required"),
    ({"prompt": "p", "model": {"precision": "int4"}}, "model.precision: "),
    ({"prompt": "p", "model": {"id": "/no/such/model"}}, "model.id: no diffusers model at /no/such/model"),
    ({"prompt": "p", "model": {"id": "acme/not-cached"}}, "model.id: acme/not-cached is not cached"),
    ({"prompt": "p", "output": {"format": "bmp"}}, "output.format: "),
    ({"prompt": "p", "image": "bm90IGFuIGltYWdl"}, "image: is not a readable image"),
    ({"prompt": "p", "image": png_b64(), "mask_image": "http://127.0.0.1:9/x.png"}, "mask_image: download failed"),
    ({"prompt": "p", "task": "inpaint", "image": png_b64()}, "mask_image: required for task 'inpaint'"),
    ({"prompt": "p", "image": png_b64(size=(8, 8))}, "image: 8x8 is smaller than 64x64"),
    ({"prompt": "p", "safety_checker": True}, "safety_checker: the embedded model ships no safety checker"),
    ({"prompt": "p", "loras": [{"scale": 1}]}, "loras[0]: give exactly one of url or id"),
]


@pytest.mark.parametrize("bad, expected", BAD_INPUTS, ids=[e.split(":")[0] for _, e in BAD_INPUTS])
def test_bad_input_names_the_field_and_the_worker_carries_on(api, bad, expected):
    answer = api.post("/runsync", {"input": bad})
    # The SDK's local API reports a yielded error as COMPLETED; production fails the job
    # (test_production_loop_* below).
    [error] = answer["output"]
    assert error["error"].startswith(expected), error
    assert "Traceback" not in error["error"]
    assert_valid_result(api.runsync(VALID)["output"][-1])


# --- Local API server, STREAMING=false: the plain handler ---

def test_plain_handler_returns_the_result_dict(plain_api):
    answer = plain_api.runsync(VALID | {"stream": True})
    assert answer["status"] == "COMPLETED"
    assert_valid_result(answer["output"])  # the dict itself, not a list


def test_plain_handler_answers_docker_diffusers_api_clients_in_their_shape(plain_api):
    answer = plain_api.runsync({"modelInputs": {"prompt": "p", "num_inference_steps": 2, "seed": 1}})
    assert answer["status"] == "COMPLETED"
    assert answer["output"]["image_base64"] and "$timings" in answer["output"]


def test_plain_handler_answers_automatic1111_clients_as_worker_a1111_does(plain_api):
    """A worker-a1111 client reads output["images"][0] as base64 and output["info"] as JSON."""
    import base64

    answer = plain_api.runsync({"prompt": "p", "steps": 2, "cfg_scale": 7, "sampler_name": "Euler a", "seed": 4,
                                "width": 64, "height": 64})
    assert answer["status"] == "COMPLETED"
    output = answer["output"]
    assert base64.b64decode(output["images"][0])[:4] == b"\x89PNG"
    assert json.loads(output["info"])["all_seeds"] == [4] and output["parameters"]["sampler_name"] == "Euler a"
    failed = plain_api.runsync({"prompt": "p", "steps": 2, "restore_faces": True})
    assert failed["status"] == "FAILED" and failed["error"].startswith("restore_faces: not supported")


def test_plain_handler_fails_bad_jobs(plain_api):
    answer = plain_api.runsync({"prompt": "p", "width": 100})
    assert answer["status"] == "FAILED"
    assert answer["error"] == "width: must be a multiple of 8, got 100"
    assert_valid_result(plain_api.runsync(VALID)["output"])


# --- The SDK's production job loop ---

def run_production(models_dir, tmp_path, jobs: list[tuple], **env) -> JobServer:
    """Run ``jobs`` — (id, input) or (id, input, {beside input}) — through the SDK's production loop."""
    server = JobServer()
    for job_id, job_input, *extra in jobs:
        server.submit(job_id, job_input, **(extra[0] if extra else {}))
    log = open(tmp_path / "worker.log", "w")
    process = subprocess.Popen(
        [sys.executable, "handler.py"], cwd=ROOT, env=worker_env(models_dir, **server.env(), **env),
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        for job_id, *_ in jobs:
            server.wait_done(job_id)
    finally:
        process.terminate()
        process.wait(20)
        log.close()
        server.close()
    text = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    return server


def test_production_loop_streams_and_fails_bad_jobs(models_dir, tmp_path):
    server = run_production(models_dir, tmp_path, [
        ("good-1", VALID | {"stream": True, "scheduler": "DDIM"}),
        ("bad", {"prompt": "p", "width": 1000, "height": 1001}),
        ("not-an-object", "draw me a cat"),
        ("good-2", VALID),
    ])
    streamed = [post["output"] for post in server.stream["good-1"]]
    assert [s["step"] for s in streamed if s.get("stage") == "inference"] == [1, 2, 3]
    assert streamed[-1]["type"] == "result"
    done = server.done["good-1"]
    assert "error" not in done and done["output"][-1]["type"] == "result"  # aggregated stream
    assert_valid_result(done["output"][-1])

    assert server.done["bad"]["error"] == "height: must be a multiple of 8, got 1001"
    assert not server.stream["bad"]
    assert server.done["not-an-object"]["error"].startswith("input: must be a JSON object, got 'draw me a cat'")
    assert_valid_result(server.done["good-2"]["output"][-1])
    assert server.done["good-2"]["output"][-1]["model"]["source"] == "memory"  # warm across jobs


def test_production_loop_plain_handler_reports_progress(models_dir, tmp_path):
    server = run_production(
        models_dir, tmp_path,
        [("p-1", VALID | {"num_inference_steps": 4, "scheduler": "DDIM"}), ("p-bad", {"prompt": 5})],
        STREAMING="false", PROGRESS_INTERVAL_S="0",
    )
    assert_valid_result(server.done["p-1"]["output"])
    steps = [p["output"]["step"] for p in server.progress["p-1"] if p["output"]["stage"] == "inference"]
    assert sorted(steps) == [1, 2, 3, 4]  # progress_update posts from threads: any order
    assert server.done["p-bad"]["error"].startswith("prompt: ")


def test_production_loop_trains_then_uploads_to_the_jobs_own_bucket(models_dir, tmp_path, s3, s3_endpoint):
    """A streamed LoRA training published to S3, then an inference that uses the new LoRA and
    whose images go to the bucket of the job's s3Config, which the SDK hands over with the job."""
    from tests.helpers import BUCKET, png_b64

    s3.create_bucket(Bucket="outputs")
    lora_url = f"s3://{BUCKET}/e2e/style.safetensors"
    train = {"task": "train", "stream": True, "train": {
        "instance_prompt": "a photo of sks toy", "instance_images": [png_b64()], "resolution": 64,
        "max_train_steps": 3, "learning_rate": 1e-2, "dest_url": lora_url}}
    s3_config = {"accessId": "test", "accessSecret": "per-job-secret", "bucketName": "outputs",
                 "endpointUrl": s3_endpoint}
    server = run_production(models_dir, tmp_path, [
        ("train-1", train),
        ("styled", VALID | {"loras": [{"url": lora_url, "scale": 0.8}]}, {"s3Config": s3_config}),
    ], AWS_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1", WRITE_DESTINATIONS=f"s3://{BUCKET}/e2e/")
    streamed = [post["output"] for post in server.stream["train-1"]]
    steps = [s["step"] for s in streamed if s.get("stage") == "train"]
    assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(set(steps))  # at most ~10 a second
    trained = streamed[-1]
    assert trained["type"] == "result" and trained["train"]["url"] == lora_url, trained
    [result] = server.done["styled"]["output"]
    assert result["images"][0]["url"] == "s3://outputs/styled/styled-0.png", result
    assert s3.get_object(Bucket="outputs", Key="styled/styled-0.png")["ContentType"] == "image/png"
    assert "per-job-secret" not in (tmp_path / "worker.log").read_text()


# --- python handler.py (test_input.json) and --test_input ---

def run_cli(models_dir, cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), *args], cwd=cwd, env=worker_env(models_dir),
        capture_output=True, text=True, timeout=180,
    )


def test_handler_runs_test_input_json(models_dir, tmp_path):
    (tmp_path / "test_input.json").write_text((ROOT / "test_input.json").read_text())
    done = run_cli(models_dir, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    expected = json.loads((ROOT / "test_input.json").read_text())["input"]
    written = tmp_path / "output" / "local_test-0.png"
    assert decode_file(written).size == (64, 64)
    assert f"seed {expected['seed']}" in done.stdout and "wrote output/local_test-0.png" in done.stdout


def test_test_input_runs_the_job_and_exits_by_outcome(models_dir, tmp_path):
    good = run_cli(models_dir, tmp_path, "--test_input", json.dumps({"input": VALID | {"stream": True}}))
    assert good.returncode == 0, good.stdout[-2000:]
    assert (tmp_path / "output" / "local_test-0.png").is_file()
    assert "torchvision" not in good.stdout + good.stderr  # (transformers' PIL fallbacks, as meant)
    bad = run_cli(models_dir, tmp_path, "--test_input", json.dumps({"input": {"prompt": "p", "width": 513}}))
    assert bad.returncode == 1
    assert "width: must be a multiple of 8, got 513" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def decode_file(path):
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image


# --- docker-diffusers-api payloads (docs/compatibility.md) ---

def test_docker_diffusers_api_payload_gets_its_answer_shape(api):
    payload = {"callInputs": {"PIPELINE": "StableDiffusionPipeline", "SCHEDULER": "DDIMScheduler",
                              "MODEL_PRECISION": "", "safety_checker": False},
               "modelInputs": {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 11}}
    [result] = api.runsync(payload)["output"]
    assert_valid_result(result)
    assert result["image_base64"] == result["images"][0]["base64"]
    assert result["$timings"] == result["timings"] and result["model"]["precision"] == "fp32"
    # Same seed, same image, whichever shape asked for it.
    same = api.runsync(VALID | {"scheduler": "DDIM"})["output"][-1]
    assert result["image_base64"] == same["images"][0]["base64"]

    several = api.runsync({"modelInputs": {"prompt": "p", "num_inference_steps": 2, "num_images_per_prompt": 2}})
    assert len(several["output"][-1]["images_base64"]) == 2


def test_docker_diffusers_api_errors_name_their_fields(api):
    [error] = api.runsync({"modelInputs": {"prompt": "p", "num_images_per_prompt": 12}})["output"]
    assert error == {"error": "modelInputs.num_images_per_prompt: at most 8 on this endpoint, got 12"}
    [error] = api.runsync({"callInputs": {"train": "dreambooth"}, "modelInputs": {"prompt": "p"}})["output"]
    assert error["error"] == "modelInputs.prompt: not supported for training by this worker"


def test_production_loop_with_an_archive_as_the_default_model(tmp_path, tiny_dir):
    """MODEL_URL on the endpoint: fetched at start-up, warm for the first job; a request's own
    URL to a private address is refused (ALLOW_PRIVATE_URLS off), the operator's is not."""
    from tests.helpers import RangeServer, pack

    server = RangeServer({"/default.tar.zst": pack(tiny_dir)})
    url = server.url + "/default.tar.zst"
    try:
        done = run_production(tmp_path / "models", tmp_path, [
            ("first", VALID),
            ("same-url", VALID | {"model": {"url": url}}),  # what the worker has: no connection made
            ("private", VALID | {"model": {"url": server.url + "/other.tar.zst"}}),
        ], MODEL_URL=url, ALLOW_PRIVATE_URLS="0")
    finally:
        server.close()
    result = done.done["first"]["output"][-1]
    assert_valid_result(result)
    assert (result["model"]["id"], result["model"]["source"]) == ("url:default.tar.zst", "memory")
    assert done.done["same-url"]["output"][-1]["model"]["source"] == "memory"
    assert done.done["private"]["error"] == (
        "model.url: host '127.0.0.1' is a private address; the operator must set ALLOW_PRIVATE_URLS=1")
    assert [p for p, _ in server.requests].count("/default.tar.zst") == 1  # one 16 MiB range: fetched once
    assert "/other.tar.zst" not in [p for p, _ in server.requests]

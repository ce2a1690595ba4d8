"""The command-line client (client/) against the worker's real local API (the SDK's
``--rp_serve_api`` server, as a subprocess): a job's images saved, its progress shown, a bad
field a non-zero exit naming it; and how it builds a request and saves images it is sent links to."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import ROOT, ApiServer, RangeServer, png_b64, worker_env


@pytest.fixture(scope="module")
def api(models_dir, tmp_path_factory):
    server = ApiServer(worker_env(models_dir), tmp_path_factory.mktemp("logs") / "client-api.log")
    yield server
    server.close()


def client(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_job_saves_its_images_and_shows_its_progress(api, tmp_path):
    done = client("a lighthouse", "--url", api.url, "--set", "num_inference_steps=3", "--set", "num_images=2",
                  "--set", "seed=5", "--set", "output={\"format\": \"webp\"}", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    paths = done.stdout.split()
    assert len(paths) == 2 and all(path.endswith(f"-{i}.webp") for i, path in enumerate(paths))
    assert [Image.open(path).size for path in paths] == [(64, 64)] * 2
    job_id = paths[0].rsplit("/", 1)[1].removesuffix("-0.webp")
    assert f"job {job_id}" in done.stderr and "inference: 100%" in done.stderr  # (its progress bar, full)
    assert "timings (ms): " in done.stderr


def test_a_failed_job_exits_non_zero_naming_the_field(api, tmp_path):
    done = client("a lighthouse", "--url", api.url, "--set", "width=513", "--out", str(tmp_path))
    assert done.returncode == 1
    assert "failed: width: must be a multiple of 8, got 513" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_request_from_a_file_the_shortcuts_and_set(tmp_path):
    from client.__main__ import build_request, parse_args

    (tmp_path / "request.json").write_text(json.dumps({"input": {"prompt": "old", "seed": 1}}))
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    args = parse_args(["new prompt", "--url", "http://x", "--input", str(tmp_path / "request.json"), "--task", "train",
                       "--model", "s3://bucket/model.tar.zst", "--set", "train.max_train_steps=2", "--set",
                       "loras=[{\"id\": \"a/b\", \"scale\": 0.8}]", "--set", "negative_prompt=fog, blur",
                       "--images", str(tmp_path / "photos")])
    request = build_request(args)
    assert request["prompt"] == "new prompt" and request["seed"] == 1 and request["task"] == "train"
    assert request["model"] == {"url": "s3://bucket/model.tar.zst"} and request["negative_prompt"] == "fog, blur"
    assert request["loras"] == [{"id": "a/b", "scale": 0.8}] and request["train"]["max_train_steps"] == 2
    assert request["stream"] is True
    [image] = request["train"]["instance_images"]
    assert image.startswith("data:image/png;base64,")
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        build_request(parse_args(["p", "--url", "http://x", "--set", "width"]))


def test_images_sent_as_links_are_downloaded(tmp_path):
    import requests

    from client.__main__ import save_images

    server = RangeServer({"/up/0.png": __import__("base64").b64decode(png_b64())})
    try:
        result = {"images": [{"url": "s3://bucket/up/0.png", "presigned_url": server.url + "/up/0.png",
                              "format": "png"}, png_b64()]}
        paths = save_images(result, "job-1", tmp_path, requests.Session())
    finally:
        server.close()
    assert [p.name for p in paths] == ["job-1-0.png", "job-1-1.png"]
    assert all(Image.open(p).size for p in paths)


def test_an_endpoint_that_is_not_there_is_one_line_and_exit_1(tmp_path):
    from tests.helpers import free_port

    done = client("p", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Connection" in done.stderr

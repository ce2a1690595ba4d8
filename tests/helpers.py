"""Test helpers that need no torch: images, a loopback HTTP server, a worker subprocess."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import requests
import zstandard
from PIL import Image, ImageChops

from tools.loopback import Loopback

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "models"
ARTIFACTS = ROOT / "test-artifacts"


def png_b64(color=(200, 30, 30), size=(64, 64), mode="RGB") -> str:
    """A plain image of one color, as base64 PNG."""
    return image_b64(Image.new(mode, size, color))


def image_b64(picture: Image.Image) -> str:
    """A picture as a request sends it: base64 PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# Two plain 64 px images that steer differently (control and reference images).
RED, BLUE = png_b64((200, 30, 30)), png_b64((30, 30, 200))


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def ours(result, i: int = 0) -> Image.Image:
    """The ``i``-th image of a worker's answer."""
    return decode(result.images[i].base64)


def diffusers_images(pipe, seed: int = 1, count: int = 1, **fields) -> list:
    """What diffusers' ``pipe`` draws for ``fields``, ``count`` images seeded ``seed + i`` on CPU
    generators, as the worker seeds them."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    return pipe(**fields, num_images_per_prompt=count, generator=generators).images


def circular(pipe):
    """The pipeline as AUTOMATIC1111 makes its Tiling: padding_mode "circular" on every Conv2d."""
    import torch

    for module in (pipe.unet, pipe.vae):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.padding_mode = "circular"
    return pipe


def pixels(answer):
    """An answered image's RGB pixels as ints (of a result: its first image's)."""
    import numpy as np

    image = answer.images[0] if hasattr(answer, "images") else answer
    return np.asarray(decode(image.base64).convert("RGB")).astype(int)


def assert_images_close(expected: Image.Image, actual: Image.Image, name: str, tolerance: int = 2) -> None:
    """Pixels may differ by ``tolerance`` (thread counts and batching move values by ±1).
    On failure, the expected, actual and difference images are saved under test-artifacts/."""
    assert expected.size == actual.size, f"{name}: size {actual.size} != {expected.size}"
    diff = ImageChops.difference(expected.convert("RGB"), actual.convert("RGB"))
    worst = max(high for _, high in diff.getextrema())
    if worst > tolerance:
        ARTIFACTS.mkdir(exist_ok=True)
        for label, image in (("expected", expected), ("actual", actual), ("diff", diff)):
            image.save(ARTIFACTS / f"{name}-{label}.png")
        raise AssertionError(f"{name}: pixels differ by up to {worst} (> {tolerance}); see {ARTIFACTS}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FileServer(Loopback):
    """A real HTTP server on loopback serving ``routes`` {path: (status, headers, body)}."""

    def __init__(self, routes: dict[str, tuple[int, dict, bytes]]):
        routes_ = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, headers, body = routes_.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.routes = routes
        super().__init__(Handler)


def worker_env(models_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: tests' model cache, loopback URLs allowed; without the
    compile caches an in-process COMPILE test pointed this process at (a worker puts them in its
    own MODELS_DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "MODEL_"))
           and k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(MODELS_DIR=str(models_dir), ALLOW_PRIVATE_URLS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class ApiServer:
    """``python handler.py --rp_serve_api`` as a subprocess: the SDK's local API, for real."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(self.port),
             "--rp_api_host", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"worker exited; log: {log_path.read_text()[-2000:]}"
            try:
                requests.get(self.url + "/docs", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.3)
        raise TimeoutError("worker API did not start")

    def post(self, path: str, body: dict | None = None, timeout: float = 120) -> dict:
        response = requests.post(self.url + path, json=body, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def runsync(self, job_input: dict) -> dict:
        return self.post("/runsync", {"input": job_input})

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class RangeServer(Loopback):
    """A real HTTP server on loopback with Range support, for archives.

    ``files`` maps paths to bytes. ``drop[path] = n`` makes the next response for ``path``
    close the connection after ``n`` bytes of body, once. ``busy[path] = [False, True, ...]``
    answers the next requests for ``path`` in turn: 503 Slow Down where True. ``pause[path]``
    waits that many seconds before each body. ``requests`` records (path, Range)."""

    def __init__(self, files: dict[str, bytes] | None = None, *, ranges: bool = True):
        self.files = dict(files or {})
        self.drop: dict[str, int] = {}
        self.busy: dict[str, list[bool]] = {}
        self.pause: dict[str, float] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):  # (enough for boto3, with this server as an S3 endpoint: /bucket/key)
                path = self.path.split("?")[0]
                outer.requests.append((path, "HEAD"))
                body = outer.files.get(path)
                busy = bool(outer.busy.get(path)) and outer.busy[path].pop(0)
                self.send_response(503 if busy else 404 if body is None else 200)
                self.send_header("Content-Length", str(len(body) if body is not None and not busy else 0))
                self.send_header("ETag", '"range-server"')
                self.end_headers()

            def do_GET(self):
                path = self.path.split("?")[0]
                header = self.headers.get("Range")
                outer.requests.append((path, header))
                body = outer.files.get(path)
                if outer.busy.get(path) and outer.busy[path].pop(0):
                    slow_down = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(slow_down)))
                    self.end_headers()
                    self.wfile.write(slow_down)
                    return
                time.sleep(outer.pause.get(path, 0))
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(body) - 1
                if header and ranges:
                    first, _, last = header.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else len(body) - 1, len(body) - 1)
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                    self.send_header("ETag", '"range-server"')
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                part = body[start:end + 1]
                cut = outer.drop.pop(path, None)
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def stream(runner, job: dict) -> list[dict]:
    """Every item the streaming handler yields for ``job`` (``{"id", "input"}``), the result last."""
    import asyncio

    async def go():
        return [item async for item in runner.stream(job)]

    return asyncio.run(go())


def at_once(work, times: int = 2) -> list:
    """``work()`` run on ``times`` threads at once: their results (in the order they finished); the
    first error, if any, raised."""
    import threading

    results, errors = [], []

    def run():
        try:
            results.append(work())
        except Exception as exc:  # raised below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def stripes(size=(128, 64)) -> Image.Image:
    """Coloured bands across the width: which part of it a model sees shows."""
    image = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), ((x * 37) % 256, (x * 11 + y * 3) % 256, 255 - (x * 5) % 256))
    return image


def generate(settings, model: dict, events: list | None = None, size: int | None = 64):
    """One 2-step txt2img on a fresh engine (a new worker) with ``model``, ``size`` px square
    (64: the DiT families' own size is a megapixel, whose decoding alone takes the tiny VAEs
    seconds; None: the model's own)."""
    from schemas import InferenceRequest
    from worker.engine import Engine

    sized = {"width": size, "height": size} if size else {}
    request = InferenceRequest.model_validate({"prompt": "p", "num_inference_steps": 2, "seed": 4, "model": model}
                                              | sized)
    return Engine(settings).generate(request, (events if events is not None else []).append, lambda: False)


def convert_and_serve(settings, model_dir: Path, key: str):
    """Publish ``model_dir`` as s3://BUCKET/``key`` (task convert, fp32), then generate with it
    directly and, on a fresh worker with an empty cache, from the archive: (direct, served)."""
    from schemas import ConvertRequest
    from worker.engine import Engine

    request = ConvertRequest.model_validate({"task": "convert", "model": {"id": str(model_dir)},
                                             "convert": {"dest_url": f"s3://{BUCKET}/{key}", "precision": "fp32"}})
    Engine(settings).convert(request, lambda event: None, lambda: False)
    direct = generate(settings, {"id": str(model_dir)})
    served = generate(settings.model_copy(update={"models_dir": settings.models_dir / "fresh"}),
                      {"url": f"s3://{BUCKET}/{key}"})
    return direct, served


def train_then_use(settings, s3, model_dir: Path, method: str, name: str, **train) -> tuple[dict, list, object, object]:
    """Train ``model_dir`` through the streaming handler (LoRA or DreamBooth, 64 px, published
    to s3://BUCKET/``name``), then draw with and without the result on the same worker:
    (the result answer, a LoRA's keys or [], the plain image result, the tuned one)."""

    from schemas import InferenceRequest
    from worker.jobs import JobRunner

    runner = JobRunner(settings, sdk_config={})
    dest = f"s3://{BUCKET}/{name}" + (".safetensors" if method == "lora" else ".tar.zst")
    job = {"id": name.replace("/", "-"), "input": {"task": "train", "model": {"id": str(model_dir)}, "train": {
        "method": method, "instance_prompt": "a photo of sks toy", "instance_images": [png_b64()],
        "resolution": 64, "max_train_steps": 2, "learning_rate": 1e-2, "class_prompt": "a toy",
        "num_class_images": 1, "class_inference_steps": 2, "precision": "fp32", "dest_url": dest} | train}}

    result = stream(runner, job)[-1]
    assert result.get("type") == "result", result

    def draw(**fields):
        request = InferenceRequest.model_validate(
            {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 9, "width": 64, "height": 64,
             "model": {"id": str(model_dir)}} | fields)
        return runner.engine().generate(request, lambda event: None, lambda: False)

    keys = []
    if method == "lora":
        from safetensors import safe_open

        path = settings.models_dir / "trained-lora.safetensors"
        path.write_bytes(s3.get_object(Bucket=BUCKET, Key=f"{name}.safetensors")["Body"].read())
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    plain = draw()
    return result, keys, plain, draw(loras=[{"url": dest}]) if method == "lora" else draw(model={"url": dest})


def training_refusal(settings, s3, model_dir: Path, **fields) -> str:
    """The error of a LoRA training request for ``model_dir`` with ``fields``, refused before
    anything is published."""
    from schemas import TrainRequest
    from worker.engine import Engine
    from worker.errors import UserInputError

    request = TrainRequest.model_validate({"task": "train", "model": {"id": str(model_dir)}, "train": {
        "method": "lora", "instance_prompt": "a photo of sks toy", "instance_images": [png_b64()],
        "dest_url": f"s3://{BUCKET}/never.safetensors"} | fields})
    try:
        Engine(settings).train(request, lambda event: None, lambda: False, "job")
    except UserInputError as error:
        assert not s3.list_objects_v2(Bucket=BUCKET).get("Contents")
        return str(error)
    raise AssertionError(f"trained with {fields}")


def hub_cache(root: Path, repo_id: str, source: Path, refs: dict[str, str]) -> Path:
    """Lay out ``source`` as huggingface_hub's cache does: models--org--name/{refs,snapshots}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for ref, commit in refs.items():
        snapshot = repo / "snapshots" / commit
        if not snapshot.exists():
            shutil.copytree(source, snapshot)
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)  # (refs/pr/1: a folder)
        (repo / "refs" / ref).write_text(commit)
    return root


def pack(model_dir: Path, *, zstd: bool = True, folder: str | None = "tiny-sd") -> bytes:
    """``model_dir`` as archive bytes (.tar.zst, or .tar), in ``folder`` or at the root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(model_dir.rglob("*")):
            relative = path.relative_to(model_dir).as_posix()
            tar.add(path, arcname=f"{folder}/{relative}" if folder else relative, recursive=False)
    data = buffer.getvalue()
    return zstandard.ZstdCompressor(level=3).compress(data) if zstd else data

"""``python -m client PROMPT [options]``: one job on an endpoint, followed to its end.

    python -m client "a lighthouse at dusk" --url http://localhost:8000
    python -m client "a lighthouse" --endpoint abc123 --set width=768 --set loras='[{"id": "x", "scale": 0.8}]'
    python -m client --endpoint abc123 --task train --images photos/ --set train.instance_prompt="a photo of sks dog" \\
        --set train.dest_url=s3://bucket/loras/sks.safetensors

The request comes from ``--input request.json`` (the job's input, or ``{"input": ...}``), then
the prompt, ``--task``, ``--model`` and each ``--set key=value`` (a dotted key reaches into an
object; a value is read as JSON where it parses, else as text); ``stream`` is on unless the
request says otherwise, so that the worker reports each step. Images are saved to ``--out``
as ``<job id>-<i>.<format>``, whether they came back as base64 or as links; Ctrl-C cancels the
job on the endpoint. Exit status: 0 done, 1 the job failed (its error printed), 2 a bad command
line, 130 cancelled.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .api import Endpoint, EndpointError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description="Run one job on an sd-worker endpoint.")
    parser.add_argument("prompt", nargs="?", help="what to draw (the request's prompt)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="a RunPod endpoint id (with RUNPOD_API_KEY in the environment)")
    where.add_argument("--url", help="the SDK's local API (python handler.py --rp_serve_api), e.g. http://localhost:8000")
    parser.add_argument("--input", type=Path, help="a JSON file with the request")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a request field (repeatable)")
    parser.add_argument("--task", help="txt2img, img2img, inpaint, edit, train or convert")
    parser.add_argument("--model", help="a hub id, a local path on the worker, or an archive URL (s3://, https://)")
    parser.add_argument("--images", type=Path, help="train: a folder of images, sent as train.instance_images")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where images are saved (default: outputs/)")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> dict:
    request: dict = {}
    if args.input:
        request = json.loads(args.input.read_text())
        request = request.get("input", request)
    if args.prompt:
        request["prompt"] = args.prompt
    if args.task:
        request["task"] = args.task
    if args.model:
        key = "url" if args.model.startswith(("s3://", "http://", "https://")) else "id"
        request.setdefault("model", {})[key] = args.model
    for assignment in args.set:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
        set_field(request, key, parse_value(text))
    if args.images:
        request.setdefault("train", {})["instance_images"] = folder_images(args.images)
    if "callInputs" not in request and "modelInputs" not in request:
        request.setdefault("stream", True)  # (progress as it goes: what the bars show)
    return request


def parse_value(text: str):
    """JSON where it parses (numbers, booleans, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def set_field(request: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = request
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value


def folder_images(folder: Path) -> list[str]:
    """The folder's images as data URIs (the worker reads them as it reads base64 input images)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {folder}: no .png, .jpg or .webp images there")
    return [f"data:{mimetypes.guess_type(p.name)[0]};base64,{base64.b64encode(p.read_bytes()).decode()}"
            for p in files]


class Bars:
    """One progress bar per stage (downloads, denoising steps, training steps with their loss)."""

    def __init__(self):
        self.bars: dict[str, tqdm] = {}

    def update(self, item: dict) -> None:
        stage = item.get("stage", "progress")
        bar = self.bars.get(stage)
        if bar is None or bar.total != item.get("total"):
            if bar is not None:
                bar.close()
            bar = self.bars[stage] = tqdm(total=item.get("total"), desc=stage, unit="step", file=sys.stderr)
        bar.n = item.get("step", 0)
        if item.get("loss") is not None:
            bar.set_postfix(loss=item["loss"], refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def save_images(result: dict, job_id: str, out: Path, session) -> list[Path]:
    """The result's images as files: native answers' ``images`` (base64 or links), AUTOMATIC1111's
    (base64 strings) and docker-diffusers-api's ``images_base64``."""
    images = result.get("images")
    if images is None and result.get("images_base64") is not None:
        legacy = result["images_base64"]
        images = [legacy] if isinstance(legacy, str) else legacy
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images or []):
        if isinstance(image, str):
            image = {"base64": image, "format": "png"}
        if image.get("base64"):
            data = base64.b64decode(image["base64"])
        else:
            link = image.get("presigned_url") or image.get("url")
            response = session.get(link, timeout=120)
            response.raise_for_status()
            data = response.content
        path = out / f"{job_id}-{i}.{image.get('format', 'png')}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    request = build_request(args)
    if args.endpoint:
        key = os.environ.get("RUNPOD_API_KEY")
        if not key:
            print("--endpoint needs RUNPOD_API_KEY in the environment", file=sys.stderr)
            return 2
        endpoint = Endpoint.runpod(args.endpoint, key)
    else:
        endpoint = Endpoint.local_server(args.url)
    try:
        job_id = endpoint.run(request)
    except (EndpointError, OSError) as error:  # (requests' connection errors are OSErrors)
        print(error, file=sys.stderr)
        return 1
    print(f"job {job_id}", file=sys.stderr)
    bars = Bars()
    result, error = None, None
    try:
        for item in endpoint.stream(job_id):
            if item.get("type") == "progress":
                bars.update(item)
            elif "error" in item:
                error = item["error"]
            elif item.get("type") == "result" or "images" in item or "images_base64" in item:
                result = item
            elif "status" in item and item["status"] != "COMPLETED" and error is None:
                error = f"the job ended {item['status']}"
    except KeyboardInterrupt:
        bars.close()
        if endpoint.local:
            print(f"job {job_id}: the local API cannot cancel a job; it runs to its end", file=sys.stderr)
            return 130
        try:
            endpoint.cancel(job_id)
            print(f"job {job_id} cancelled", file=sys.stderr)
        except (EndpointError, OSError) as error:
            print(f"job {job_id}: could not cancel it ({error})", file=sys.stderr)
        return 130
    except (EndpointError, OSError) as err:
        error = str(err)
    bars.close()
    if error is not None or result is None:
        print(f"job {job_id} failed: {error or 'no result'}", file=sys.stderr)
        return 1
    for path in save_images(result, job_id, args.out, endpoint.session):
        print(path)
    for kind in ("train", "convert"):  # (what a training or conversion published)
        if result.get(kind):
            print(json.dumps({kind: result[kind]}))
    if result.get("timings"):
        print("timings (ms): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

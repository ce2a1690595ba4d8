"""Cold start as a whole process: from ``python handler.py`` to the first image (issue 15).

``python -m bench.coldstart --whole-process`` runs this. The model is bench.coldstart's SD
1.5-sized one (random fp16 weights), packed by the converter (``worker.sources.publish.pack``:
configs first, then weights) and served by bench.coldstart's throttled server (a process of its
own; by default 60 MB/s per connection and 300 MB/s in all). Each round, in a fresh MODELS_DIR:

- **ours**: ``python handler.py --test_input '{"input": {"model": {"url": ...}, 64 px, 1 step}}'``,
  timed from the process's start to the image written (its "wrote" line), with the job's own
  ``timings``;
- **baseline**: a process that does what users do today: boto3 ``download_file``, then
  ``tarfile`` extraction, then ``import diffusers`` and ``from_pretrained`` (as the worker loads:
  fp32 on the CPU, fp16 on CUDA with ``--device cuda``), then the same image;
- **link**: the archive's bytes alone, through the same connections, thrown away;
- **image**: one image, the first of a pipeline loaded from disk in a warm process.

Targets: ours at least 3x faster than the baseline, and at most 1.5x (link + image).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def converter_archive(model: Path, out: Path) -> Path:
    if not out.is_file():
        from worker.sources.publish import pack

        pack(model, out, "zstd")
    return out


def _job(url: str) -> dict:
    return {"input": {"prompt": "a lighthouse", "model": {"url": url}, "width": 64, "height": 64,
                      "num_inference_steps": 1, "seed": 1}}


def ours(url: str, work: Path, concurrency: int) -> tuple[float, dict]:
    models = work / "models"
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
    env = dict(os.environ, MODELS_DIR=str(models), ALLOW_PRIVATE_URLS="1", LOCAL_OUTPUT_DIR=str(work / "out"),
               PYTHONPATH=path, DOWNLOAD_CONCURRENCY=str(concurrency))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "handler.py", "--test_input", json.dumps(_job(url))], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    elapsed = None
    for line in process.stdout:  # the image is written before the SDK winds down (seconds, freeing the model)
        output.append(line)
        if line.startswith("wrote ") and elapsed is None:
            elapsed = time.perf_counter() - start
    process.wait()
    done = subprocess.CompletedProcess(process.args, process.returncode, "".join(output), "")
    found = re.search(r"'timings': (\{[^}]*\})", done.stdout + done.stderr)
    if done.returncode or not found or not list((work / "out").glob("*.png")):
        raise RuntimeError(f"ours failed: {(done.stdout + done.stderr)[-3000:]}")
    return elapsed, ast.literal_eval(found.group(1))


_BASELINE = """
import sys, tarfile, time
from pathlib import Path
import boto3, zstandard
endpoint, key, work, device = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                      region_name="us-east-1")
archive = work / "model.tar.zst"
client.download_file("bench", key, str(archive))
with open(archive, "rb") as raw:
    tar = tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|")
    tar.extractall(work / "model", filter="data")
archive.unlink()
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(work / "model", dtype=torch.float16 if device == "cuda" else torch.float32)
pipe.to(device)
image = pipe("a lighthouse", width=64, height=64, num_inference_steps=1,
             generator=torch.Generator().manual_seed(1)).images[0]
image.save(work / "baseline.png")
"""


def baseline(endpoint: str, key: str, work: Path, device: str) -> float:
    start = time.perf_counter()
    with open(work.parent / f"{work.name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", _BASELINE, endpoint, key, str(work), device], stdout=log,
                                   stderr=log, text=True)
        while process.poll() is None and not (work / "baseline.png").is_file():
            time.sleep(0.01)
        elapsed = time.perf_counter() - start  # (the image saved, as for ours)
        process.wait()
    done = subprocess.CompletedProcess(process.args, process.returncode, "", (work.parent / f"{work.name}.log")
                                       .read_text())
    if done.returncode:
        raise RuntimeError(f"baseline failed: {done.stderr[-3000:]}")
    return elapsed


def link(url: str, concurrency: int) -> float:
    """The archive's bytes through our parallel ranged GETs, thrown away: what the link allows."""
    from worker.settings import Settings
    from worker.sources.storage import open_download, parse_location

    settings = Settings(allow_private_urls=True, download_concurrency=concurrency)
    start = time.perf_counter()
    with open_download(parse_location(url, "url", settings, None, "fp32"), "url", settings, trusted=True) as download:
        for _ in download.chunks():
            pass
    return time.perf_counter() - start


def one_image(model: Path, device: str) -> float:
    """The first image of a pipeline freshly loaded from disk (imports done): what the worker's first
    job must compute once its weights are in."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float16 if device == "cuda" else torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe("a lighthouse", width=64, height=64, num_inference_steps=1, generator=torch.Generator().manual_seed(1))
    elapsed = time.perf_counter() - start
    del pipe
    return elapsed


def run(args, model: Path) -> None:
    from bench.coldstart import ServerProcess

    archive = converter_archive(model, args.work / "sd15-converter.tar.zst")
    server = ServerProcess({f"/bench/{archive.name}": archive}, args.conn_mbps * 1e6, args.link_mbps * 1e6)
    url = f"{server.url}/bench/{archive.name}"
    print(f"archive {archive.stat().st_size / 1e9:.2f} GB (converter's order); link {args.link_mbps:.0f} MB/s, "
          f"{args.conn_mbps:.0f} MB/s per connection; {args.rounds} rounds; whole processes, 64 px, 1 step, "
          f"{args.device}")
    rows: dict[str, list[float]] = {"ours": [], "baseline": [], "link": [], "image": []}
    phases: list[dict] = []
    for round_ in range(args.rounds):
        for name in ("ours", "baseline"):
            work = args.work / f"process-{name}-{round_}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if name == "ours":
                elapsed, timings = ours(url, work, args.concurrency)
                phases.append(timings)
            else:
                elapsed = baseline(server.url, f"{archive.name}", work, args.device)
            rows[name].append(elapsed)
            shutil.rmtree(work, ignore_errors=True)
        rows["link"].append(link(url, args.concurrency))
        rows["image"].append(one_image(model, args.device))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items())
              + f"; ours' timings {phases[-1]}")
    server.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = med["link"] + med["image"]
    print(f"{'':>10} {'median s':>9}   rounds")
    for name, samples in rows.items():
        print(f"{name:>10} {med[name]:>9.2f}   " + " / ".join(f"{s:.2f}" for s in samples))
    ours_phases = {k: statistics.median(p.get(k, 0) for p in phases) / 1000 for k in phases[0]}
    print("ours, median phases s: " + ", ".join(f"{k} {v:.2f}" for k, v in ours_phases.items()))
    print(f"baseline / ours: {med['baseline'] / med['ours']:.2f}x (target >= 3); "
          f"ours / (link + image): {med['ours'] / floor:.2f} (target <= 1.5)")

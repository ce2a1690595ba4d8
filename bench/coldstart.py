"""Cold start from an archive: our streamed fetch + extract + load against what users run today.

An SD 1.5-sized model (full-size UNet with random weights, fp16, about 1.7 GB) is packed as
.tar.zst and .tar and served by a local server (a process of its own) that speaks enough S3 for
boto3 (HEAD, ranged GET) and caps each connection (--conn-mbps, like S3) and the total (--link-mbps). Each round
measures, in a fresh cache dir:

- baseline: boto3 ``download_file`` (its default concurrency), then ``tarfile`` extraction
  (through zstandard for .tar.zst), then ``DiffusionPipeline.from_pretrained``;
- ours over s3:// (boto3's transfer manager streaming into the extractor) and over https://
  (parallel ranged GETs): ``worker.sources.locate.fetch_archive``, then the same ``from_pretrained``.

Medians of --rounds rounds, as ratios to the baseline and as a fraction of the link rate.

    .venv/bin/python -m bench.coldstart --rounds 3
    .venv/bin/python -m bench.coldstart --whole-process --rounds 3 --conn-mbps 60 --link-mbps 300
    python -m bench.coldstart --rounds 3 --link-mbps 1600 --concurrency 16 --device cuda   # a GPU worker
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tarfile
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tools.loopback import Loopback

_PIECE = 256 * 1024


class ThrottledServer(Loopback):
    """Files by path (/bucket/key), with Range, paced per connection and in total."""

    def __init__(self, files: dict[str, Path], conn_rate: float, link_rate: float):
        self.files = files
        lock = threading.Lock()
        state = {"link_next": time.monotonic()}

        def pace(n: int, conn: dict) -> None:
            now = time.monotonic()
            with lock:
                state["link_next"] = max(state["link_next"], now) + n / link_rate
                link_at = state["link_next"]
            conn["next"] = max(conn["next"], now) + n / conn_rate
            delay = max(link_at, conn["next"]) - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _head(self, path: Path, status: int, start: int, end: int) -> None:
                size = path.stat().st_size
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"bench"')
                self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
                self.send_header("Content-Type", "application/octet-stream")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()

            def _resolve(self):
                path = files.get(self.path.split("?")[0])
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return path

            def do_HEAD(self):
                if path := self._resolve():
                    self._head(path, 200, 0, path.stat().st_size - 1)

            def do_GET(self):
                path = self._resolve()
                if path is None:
                    return
                size = path.stat().st_size
                start, end, status = 0, size - 1, 200
                if header := self.headers.get("Range"):
                    first, _, last = header.removeprefix("bytes=").partition("-")
                    start, end, status = int(first), min(int(last or size - 1), size - 1), 206
                self._head(path, status, start, end)
                conn = {"next": time.monotonic()}
                with open(path, "rb") as f:
                    offset = start
                    while offset <= end:
                        piece = os.pread(f.fileno(), min(_PIECE, end - offset + 1), offset)
                        pace(len(piece), conn)
                        self.wfile.write(piece)
                        offset += len(piece)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def _serve(files: dict[str, Path], conn_rate: float, link_rate: float, pipe) -> None:
    server = ThrottledServer(files, conn_rate, link_rate)
    pipe.send(server.url)
    pipe.recv()  # until told to stop
    server.close()


class ServerProcess:
    """ThrottledServer in a process of its own, as S3 is on a machine of its own: in the
    client's process, the server's threads would compete with the client's for one GIL."""

    def __init__(self, files: dict[str, Path], conn_rate: float, link_rate: float):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(files, conn_rate, link_rate, child), daemon=True)
        self._process.start()
        self.url = self._pipe.recv()

    def close(self) -> None:
        self._pipe.send(None)
        self._process.join(10)


def make_model(out: Path) -> Path:
    """A Stable Diffusion 1.5-sized pipeline: SD 1.5's UNet config, random weights, fp16."""
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import UNet2DConditionModel

    from builder import tiny_model

    tiny_model.build(out)  # VAE, text encoder, tokenizer, scheduler: small parts
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=32, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, attention_head_dim=8,
    ).to(torch.float16)
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def pack(model: Path, out: Path, zstd: bool) -> Path:
    if out.is_file():
        return out
    with open(out, "wb") as raw:
        if zstd:
            import zstandard

            with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as writer:
                with tarfile.open(fileobj=writer, mode="w|") as tar:
                    tar.add(model, arcname="model")
        else:
            with tarfile.open(fileobj=raw, mode="w") as tar:
                tar.add(model, arcname="model")
    return out


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                        region_name="us-east-1")


def load(path: Path, device: str) -> float:
    """from_pretrained in fp16, then onto the device (on CUDA, until the copies have landed)."""
    import torch
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float16)
    if device == "cuda":
        pipe.to(device)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del pipe
    return elapsed


def baseline(endpoint: str, key: str, work: Path, device: str) -> tuple[float, float]:
    """What users run today: download the file, extract it, load it. Returns (fetch+extract, load)."""
    start = time.perf_counter()
    archive = work / Path(key).name
    s3_client(endpoint).download_file("bench", key, str(archive))
    with open(archive, "rb") as raw:
        stream = raw
        if key.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(work / "extracted", filter="data")
    archive.unlink()
    fetched = time.perf_counter() - start
    return fetched, load(work / "extracted" / "model", device)


def ours(url: str, work: Path, endpoint: str, device: str, concurrency: int) -> tuple[float, float]:
    from schemas import ModelSpec
    from worker.settings import Settings
    from worker.sources.cache import DiskCache
    from worker.sources.locate import fetch_archive
    from worker.sources.refs import model_ref

    settings = Settings(models_dir=work, aws_s3_endpoint_url=endpoint, aws_access_key_id="bench",
                        aws_secret_access_key="bench", aws_default_region="us-east-1", allow_private_urls=True,
                        download_concurrency=concurrency)
    start = time.perf_counter()
    path, source = fetch_archive(model_ref(ModelSpec(url=url), settings, "cpu"), settings, DiskCache(settings),
                                 lambda event: None)
    assert source == "url"
    fetched = time.perf_counter() - start
    return fetched, load(path, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conn-mbps", type=float, default=90, help="cap per connection, MB/s")
    parser.add_argument("--link-mbps", type=float, default=400, help="cap on all connections together, MB/s")
    parser.add_argument("--concurrency", type=int, default=8, help="our DOWNLOAD_CONCURRENCY (the default: 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides load the model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-coldstart"))
    parser.add_argument("--whole-process", action="store_true",
                        help="process start to first image, against download-then-load (bench/coldstart_process.py)")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "sd15-random")
    if args.whole_process:
        from bench.coldstart_process import run

        return run(args, model)
    archives = {"tar.zst": pack(model, args.work / "sd15.tar.zst", zstd=True),
                "tar": pack(model, args.work / "sd15.tar", zstd=False)}
    server = ServerProcess({f"/bench/{p.name}": p for p in archives.values()},
                           args.conn_mbps * 1e6, args.link_mbps * 1e6)
    print(f"model {sum(f.stat().st_size for f in model.rglob('*') if f.is_file()) / 1e9:.2f} GB; "
          + ", ".join(f"{k} {p.stat().st_size / 1e9:.2f} GB" for k, p in archives.items())
          + f"; link {args.link_mbps:.0f} MB/s, {args.conn_mbps:.0f} MB/s per connection; {args.rounds} rounds; "
          + f"ours {args.concurrency} connections; loaded on {args.device}")
    load(model, args.device)  # warm the imports (and on CUDA, its context) for both sides alike
    rows = []
    for fmt, archive in archives.items():
        key = f"/bench/{archive.name}"
        times: dict[str, list[tuple[float, float]]] = {"baseline": [], "ours s3": [], "ours https": []}
        for round_ in range(args.rounds):
            for name, run in (
                ("baseline", lambda w: baseline(server.url, key.split("/", 2)[2], w, args.device)),
                ("ours s3", lambda w: ours(f"s3://bench/{archive.name}", w, server.url, args.device,
                                          args.concurrency)),
                ("ours https", lambda w: ours(server.url + key, w, server.url, args.device, args.concurrency)),
            ):
                work = args.work / f"run-{name.replace(' ', '-')}-{round_}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                times[name].append(run(work))
                shutil.rmtree(work, ignore_errors=True)
        base_total = statistics.median(f + load for f, load in times["baseline"])
        for name, samples in times.items():
            fetch = statistics.median(f for f, _ in samples)
            total = statistics.median(f + load for f, load in samples)
            rate = archive.stat().st_size / 1e6 / fetch
            rows.append((fmt, name, fetch, statistics.median(load for _, load in samples), total, base_total / total,
                         rate / args.link_mbps))
    server.close()
    print(f"{'archive':>8} {'method':>11} {'fetch+extract s':>16} {'load s':>7} {'total s':>8} "
          f"{'vs baseline':>12} {'of link':>8}")
    for fmt, name, fetch, load_s, total, speedup, link in rows:
        print(f"{fmt:>8} {name:>11} {fetch:>16.2f} {load_s:>7.2f} {total:>8.2f} {speedup:>11.2f}x {link:>8.2f}")


if __name__ == "__main__":
    main()

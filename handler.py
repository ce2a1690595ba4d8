"""Stable Diffusion worker for RunPod serverless: the entry point.

A job is ``{"input": {...}}`` (schemas/, docs/requests.md), for example::

    {"input": {"prompt": "a lighthouse at dawn", "width": 512, "height": 512,
               "num_inference_steps": 25, "seed": 42, "stream": true}}

What comes back (schemas/result.py, docs/requests.md): with ``stream: true`` progress events
``{"type": "progress", "stage": "inference", "step": 3, "total": 25}`` while it works, and
always the result last::

    {"type": "result", "task": "txt2img",
     "images": [{"base64": "...", "format": "png", "seed": 42, "width": 512, "height": 512}],
     "timings": {"inference": 812.5, "encode": 21.0, "total_ms": 840.2},
     "model": {"id": "...", "source": "memory", "precision": "fp16", "device": "cuda"}}

Other jobs: ``task: "train"`` (DreamBooth / LoRA fine-tuning, published to S3; the result
carries ``train``), ``task: "convert"`` (a model published as a safetensors archive; the
result carries ``convert``). ``loras``, ``embeddings``, ``controlnets``, ``ip_adapter``,
``vae``, ``hires`` and ``output.upload_url`` (or the job's ``s3Config``) change how an
inference runs and how its images come back.

docker-diffusers-api payloads (``{"callInputs": ..., "modelInputs": ...}``) and AUTOMATIC1111
API payloads (``{"prompt": ..., "steps": 25, "cfg_scale": 7, ...}``, as RunPod's worker-a1111
takes them) are translated and answered in those projects' shapes (schemas/compat.py,
schemas/a1111.py).

A bad request answers ``{"error": "width: must be a multiple of 8, got 513"}`` and the worker
serves the next job.

Who does what: ``worker.settings`` reads the environment; ``worker.jobs`` turns jobs into
engine calls and exceptions into answers; ``worker.engine`` runs a job on a warm pipeline
owned by ``worker.models``, asking the model's family (``worker.families``) what it can do;
``worker.sources`` finds the weights (hub caches, archives by URL, single-file checkpoints)
and publishes models; ``worker.parts`` adds what a request brings (LoRAs, embeddings,
ControlNets, VAEs, IP-Adapters, prompts, schedulers); ``worker.train`` fine-tunes;
``schemas`` validates requests and shapes results, torch-free. docs/development.md has the map.

Start-up (nothing heavy happens at import):
1. read Settings from the environment;
2. pick the handler: ``local`` when the SDK will run one test job (``python handler.py``,
   ``--test_input``), else ``stream`` (a generator), or ``plain`` with STREAMING=false;
3. import the engine (torch, diffusers) on the engine thread while the SDK imports; outside
   local tests, load the default model next (PRELOAD_MODEL): its archive, if it has one,
   streams in meanwhile, fetched by a process of its own (worker/sources/fetches.py);
4. hand over to ``runpod.serverless.start``. A job's ``model.url`` starts fetching the moment
   the job is read, and loads while it arrives (docs/models.md, cold starts).
"""

from __future__ import annotations

import logging
import sys


def _runs_one_local_job(argv: list[str], settings) -> bool:
    """The SDK's own rule (runpod.serverless.worker._is_local) for running a single test job."""
    if "--rp_serve_api" in argv or settings.runpod_realtime_port:
        return False
    return any(arg.startswith("--test_input") for arg in argv) or not settings.on_runpod


def _local_job(argv: list[str]) -> dict | None:
    """The job the SDK will run locally, as it finds it: ``--test_input JSON``, else test_input.json."""
    import json
    from pathlib import Path

    for i, arg in enumerate(argv):
        text = arg.partition("=")[2] if arg.startswith("--test_input=") else None
        if arg == "--test_input" and i + 1 < len(argv):
            text = argv[i + 1]
        if text is not None:
            break
    else:
        path = Path("test_input.json")
        text = path.read_text() if path.is_file() else None
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None  # the SDK will say so


def main() -> None:
    from worker.jobs import JobRunner
    from worker.settings import Settings

    settings = Settings()
    config: dict = {"return_aggregate_stream": True}
    runner = JobRunner(settings, config)
    local = _runs_one_local_job(sys.argv, settings)
    job = _local_job(sys.argv) if local else None
    # A local job's model starts fetching now, before the SDK has even imported; a local job
    # that will be refused needs no engine: the process answers and exits at once.
    if job is None or runner.read_ahead(job):
        # The engine (torch, diffusers) imports on its own thread while the SDK imports here.
        runner.start(warm_up=settings.preload_model and not local)

    import runpod
    from runpod.serverless.modules.rp_logger import RunPodLogger

    # force: importing runpod already installed a root handler of its own.
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    RunPodLogger().set_level(settings.runpod_log_level)
    # Without torchvision (not installed: the worker's images are PIL), transformers serves each
    # image processor's PIL backend, as it should, but warns so at every start.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())
    if local:
        config["handler"] = runner.local
    else:
        config["handler"] = runner.stream if settings.streaming else runner.plain
    runpod.serverless.start(config)


if __name__ == "__main__":
    main()

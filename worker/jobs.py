"""RunPod jobs in, answers out: the edge between the SDK and the engine.

``JobRunner`` offers the three handlers handler.py registers:

- ``stream`` (default): an async generator yielding progress events (when the request says
  ``stream: true``) and the result last;
- ``plain`` (STREAMING=false): returns the result dict; progress goes to ``progress_update``;
- ``local`` (``python handler.py``, ``--test_input``): the SDK does not iterate generators
  there, so this runs the job, writes the images to LOCAL_OUTPUT_DIR and returns a summary.

The engine runs on one worker thread, so the SDK's event loop stays free for heartbeats,
streaming and cancellation while the GPU works. Every exception becomes the contract's error
answer here and nowhere else (worker.errors.answer_for).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from schemas import ConvertRequest, InferenceRequest, Progress, Result, TrainRequest, parse_request
from schemas.a1111 import a1111_answer, a1111_message
from schemas.compat import legacy_message

from .errors import answer_for
from .images import infotext
from .settings import Settings
from .timing import ms_since

log = logging.getLogger(__name__)

Request = InferenceRequest | ConvertRequest | TrainRequest


class JobRunner:
    def __init__(self, settings: Settings, sdk_config: dict[str, Any], engine: Any = None):
        """``engine``: one already running (tests share a warm one); else created on first use."""
        self.settings = settings
        # The SDK reads config["refresh_worker"] after a generator job: the only way a
        # streaming handler can ask for a fresh worker.
        self.sdk_config = sdk_config
        self._engine = engine
        self._engine_lock = threading.Lock()
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._startup: tuple[float, float] | None = None  # start()'s import: how long, when done

    # --- The engine, created on first use (it imports torch) ---

    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                from .engine import Engine

                self._engine = Engine(self.settings)
            return self._engine

    def start(self, warm_up: bool) -> None:
        """Get ready for the first job before it comes: torch, diffusers and the engine import
        on the engine thread now (while the SDK imports and starts); with ``warm_up``, the
        default model is loaded next, its archive (MODEL_URL) streaming in meanwhile.

        Jobs queue behind this on the engine thread; the first one's timings say what start-up
        cost (``startup``) and how long it waited (``wait``)."""
        self._gpu.submit(self._start_engine)
        if warm_up:
            self._prefetch(None)
            self._gpu.submit(self._warm_up)

    def _start_engine(self) -> None:
        start = time.perf_counter()
        try:
            self.engine()
        except Exception as exc:  # the first job will retry, and answer with the reason
            log.warning("start-up failed: %s", answer_for(exc, self.settings.secrets())[0])
        self._startup = (ms_since(start), time.perf_counter())

    def read_ahead(self, job: dict) -> bool:
        """A job known before the SDK hands it over (a local test's): its model starts fetching
        now. False if the job will be refused (it answers with the reason itself)."""
        try:
            request = parse_request(job.get("input"), self.settings.limits)
        except Exception:  # noqa: BLE001
            return False
        self._prefetch(request)
        return True

    def _prefetch(self, request: Request | None) -> None:
        """Start fetching the archive the request's model (None: the default model) comes in,
        torch-free, unless it is installed already (worker/sources/fetches.py); the engine
        joins the fetch when it gets to the job. What fails here, the job reports."""
        from schemas import ModelSpec

        from .sources.locate import prefetch

        spec = ModelSpec() if request is None else getattr(request, "model", None)
        if not isinstance(spec, ModelSpec):
            return
        engine = self._engine
        try:
            prefetch(spec, self.settings, warm=engine.models.holds if engine is not None else None)
        except Exception as exc:
            log.debug("prefetch skipped: %s", answer_for(exc, self.settings.secrets())[0])

    def _warm_up(self) -> None:
        try:
            self.engine().warm_up()
        except Exception as exc:  # the first job will retry, and answer with the reason
            log.warning("warm-up failed: %s", answer_for(exc, self.settings.secrets())[0])

    # --- The handlers ---

    async def stream(self, job: dict) -> AsyncIterator[dict]:
        async for item in self._run(job, lambda request: request.stream):
            yield item.dump() if isinstance(item, Progress) else item

    async def plain(self, job: dict) -> dict:
        last_sent = 0.0

        def report(event: Progress) -> None:
            nonlocal last_sent
            now = time.monotonic()
            if now - last_sent >= self.settings.progress_interval_s or event.step == event.total:
                last_sent = now
                import runpod

                runpod.serverless.progress_update(job, event.dump())

        async for item in self._run(job, lambda request: self.settings.on_runpod):
            if isinstance(item, Progress):
                report(item)
            else:
                return item
        raise AssertionError("_run ended without an answer")

    async def local(self, job: dict) -> dict:
        answer = await self.plain(job)
        for key in ("image_base64", "images_base64"):  # printed below as files instead
            answer.pop(key, None)
        out_dir = self.settings.local_output_dir
        for i, image in enumerate(answer.get("images", [])):
            if "base64" not in image:  # uploaded: its URL is in the answer
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{job['id']}-{i}.{image['format']}"
            path.write_bytes(base64.b64decode(image.pop("base64")))
            image["file"] = str(path)
            print(f"wrote {path} ({image['width']}x{image['height']}, seed {image['seed']})", flush=True)
        return answer

    # --- Shared ---

    async def _run(self, job: dict, wants_progress: Callable[[Request], bool]) -> AsyncIterator[Any]:
        """Yield Progress events, then the answer: the result dict, or the error dict."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        work = request = None
        try:
            request = parse_request(job.get("input"), self.settings.limits)
            self._prefetch(request)
            emit = _to_loop(loop, events) if wants_progress(request) else _ignore
            work = loop.run_in_executor(self._gpu, self._generate, job, request, emit, cancel, start)
            work.add_done_callback(lambda _: events.put_nowait(None))
            while (event := await events.get()) is not None:
                yield event
            result: Result = await work
            result.timings["total_ms"] = ms_since(start)
            log.info(
                "job %s: %s on %s (%s), %d image(s), %s",
                job.get("id"), result.task, result.model.id, result.model.source, len(result.images), result.timings,
            )
            yield self._answer(result, legacy=getattr(request, "legacy", False), a1111=getattr(request, "a1111", None))
        except Exception as exc:
            legacy = job.get("input") if getattr(request, "legacy", False) else None
            yield self._answer(exc, secrets=_job_secrets(job), a1111=getattr(request, "a1111", None), legacy=legacy)
        finally:
            # Done: a no-op. Cancelled by RunPod (the SDK cancels the task iterating us):
            # stop the denoising loop at its next step, and log how the job ended.
            cancel.set()
            if work is not None and not work.done():
                job_id = job.get("id")
                secrets = self.settings.secrets() + _job_secrets(job)
                work.add_done_callback(lambda f: log.info("job %s abandoned: %s", job_id, _outcome(f, secrets)))

    def _generate(self, job: dict, request: Request, emit, cancel: threading.Event, received: float) -> Result:
        """On the engine thread. Reports the time spent queued (behind warm-up) and starting up."""
        phases = {"wait": ms_since(received)}
        outbox = None
        if isinstance(request, InferenceRequest):  # checked before the GPU works for nothing
            from .outputs import outbox_for

            outbox = outbox_for(request.output.upload_url, job.get("s3Config"), job.get("id"), self.settings,
                                (request.num_images, request.output.format))
        if self._engine is None:  # this job pays for importing torch and diffusers
            start = time.perf_counter()
            self.engine()
            phases["startup"] = ms_since(start)
        elif self._startup is not None:  # imported at start(): told the first job, if it waited for it
            if received < self._startup[1]:
                phases["startup"] = self._startup[0]
            self._startup = None
        engine = self.engine()
        if isinstance(request, ConvertRequest):
            result = engine.convert(request, emit, cancel.is_set)
        elif isinstance(request, TrainRequest):
            result = engine.train(request, emit, cancel.is_set, job.get("id"))
        else:
            result = engine.generate(request, emit, cancel.is_set, outbox)
        result.timings = {k: v for k, v in phases.items() if v >= 1} | result.timings
        return result

    def _answer(self, outcome: Result | BaseException, legacy: Any = False, secrets: list[str] = (),
                a1111: dict | None = None) -> dict:
        """The answer: the result, or the error; ``legacy`` (a docker-diffusers-api payload) and
        ``a1111`` (an AUTOMATIC1111 one) give it those APIs' shape, and name fields their way."""
        if isinstance(outcome, Result):
            answer = outcome.dump()
            if a1111 is not None:  # AUTOMATIC1111's shape: images as base64 strings, its info
                texts = [infotext(image.get("base64")) for image in answer.get("images", [])]
                return a1111_answer(answer, a1111, texts)
            if legacy:  # docker-diffusers-api's fields, beside ours (docs/compatibility.md)
                images = [image["base64"] for image in answer["images"] if "base64" in image]
                if len(images) == 1:
                    answer["image_base64"] = images[0]
                elif images:
                    answer["images_base64"] = images
                answer["$timings"] = answer["timings"]
            return answer
        message, refresh = answer_for(outcome, self.settings.secrets() + list(secrets))
        if a1111 is not None:  # the field as the client sent it
            message = a1111_message(message)
        elif legacy:
            message = legacy_message(message, legacy)
        log.warning("job failed: %s", message)
        if refresh:
            self.sdk_config["refresh_worker"] = True
        return {"error": message}


def _outcome(future, secrets: list[str]) -> str:
    exc = future.exception()
    return "finished anyway" if exc is None else answer_for(exc, secrets)[0]


def _job_secrets(job: dict) -> list[str]:
    """The job's own credentials (RunPod's s3Config), never to be echoed back."""
    config = job.get("s3Config")
    secret = config.get("accessSecret") if isinstance(config, dict) else None
    return [secret] if isinstance(secret, str) and len(secret) >= 4 else []



def _to_loop(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Progress], None]:
    return lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)


def _ignore(event: Progress) -> None:
    pass

"""A local stand-in for RunPod's job queue, speaking the protocol the SDK's production loop uses.

The worker (``python handler.py`` with RUNPOD_WEBHOOK_* pointing here) GETs job-take for
work (200 with a job, or 204), POSTs each streamed output to job-stream, progress and the end
to job-done, long-polls job-stop and pings. Everything it posts is recorded per job id.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from tests.helpers import Loopback


class JobServer(Loopback):
    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.stream: dict[str, list] = defaultdict(list)
        self.progress: dict[str, list] = defaultdict(list)
        self.done: dict[str, dict] = {}
        self.pings = 0
        self._done_event = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = urlsplit(self.path).path
                if "/job-take/" in path:
                    try:
                        return self._reply(200, server.jobs.get(timeout=0.5))
                    except queue.Empty:
                        return self._reply(204)
                if "/job-stop/" in path:
                    time.sleep(0.5)  # a long poll with nothing to stop
                    return self._reply(204)
                if "/ping/" in path:
                    server.pings += 1
                    return self._reply(200, {})
                return self._reply(404, {})

            def do_POST(self):
                parts = urlsplit(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
                job_id = parts.path.rstrip("/").rsplit("/", 1)[-1]
                if "/job-stream/" in parts.path:
                    server.stream[job_id].append(body)
                elif "/job-done/" in parts.path:
                    if body.get("status") == "IN_PROGRESS":
                        server.progress[job_id].append(body)
                    else:
                        with server._done_event:
                            server.done[job_id] = body
                            server._done_event.notify_all()
                self._reply(200, {})

            def log_message(self, *args):
                pass

        super().__init__(Handler)

    def env(self) -> dict[str, str]:
        """The variables RunPod sets on a serverless worker, pointed at this server."""
        base = f"{self.url}/v2/test-endpoint"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_POD_ID": "test-worker",
            "RUNPOD_AI_API_KEY": "test-key",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "RUNPOD_PING_INTERVAL": "1000",
        }

    def submit(self, job_id: str, job_input, **extra) -> None:
        """Queue a job; ``extra`` goes beside ``input`` (RunPod's ``s3Config``, ...)."""
        self.jobs.put({"id": job_id, "input": job_input, **extra})

    def wait_done(self, job_id: str, timeout: float = 120) -> dict:
        with self._done_event:
            if not self._done_event.wait_for(lambda: job_id in self.done, timeout):
                raise TimeoutError(f"job {job_id} never finished")
            return self.done[job_id]


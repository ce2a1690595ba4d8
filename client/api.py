"""An endpoint's job API, as RunPod serves it and as the SDK's local server (``--rp_serve_api``)
does: /run submits, /stream/{id} gives the job's output as it comes, /cancel/{id} stops it. The
local server differs: /stream and /status by POST, and /stream answers once, when the job is
done, with all of its output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import requests

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@dataclass
class Endpoint:
    base: str  # https://api.runpod.ai/v2/<id>, or the local server's URL
    api_key: str | None = None
    local: bool = False
    session: requests.Session = field(default_factory=requests.Session)

    @classmethod
    def runpod(cls, endpoint_id: str, api_key: str) -> Endpoint:
        return cls(f"https://api.runpod.ai/v2/{endpoint_id}", api_key)

    @classmethod
    def local_server(cls, url: str) -> Endpoint:
        return cls(url.rstrip("/"), local=True)

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = self.session.request(method, self.base + path, json=body, headers=headers, timeout=timeout)
        if response.status_code >= 400:
            raise EndpointError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def run(self, job_input: dict) -> str:
        """Submit a job; its id."""
        return self._call("POST", "/run", {"input": job_input})["id"]

    def stream(self, job_id: str, poll_s: float = 1.0) -> Iterator[dict]:
        """The job's output items as they come (progress, then the result or an error), then
        one {"status": ...} item when the job has ended."""
        while True:
            method = "POST" if self.local else "GET"  # (the local server answers when the job is done)
            answer = self._call(method, f"/stream/{job_id}", timeout=3600 if self.local else 60)
            for chunk in answer.get("stream") or []:
                yield chunk.get("output", chunk)
            status = answer.get("status", "COMPLETED" if self.local else "IN_PROGRESS")
            if status in TERMINAL:
                yield {"status": status, **({"error": answer["error"]} if answer.get("error") else {})}
                return
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> None:
        """Stop the job on RunPod (the local server has no /cancel)."""
        self._call("POST", f"/cancel/{job_id}", timeout=10)


class EndpointError(RuntimeError):
    """The endpoint refused a call (bad key, unknown endpoint, server error)."""

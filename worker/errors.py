"""The worker's exceptions, and the one place they become the contract's error answer.

Code inside raises; ``answer_for`` (called only by worker.jobs) turns any exception into
``{"error": "field: what was wrong"}`` and decides from its *type* whether the GPU is in a
doubtful state and RunPod should give us a fresh worker (docs/requests.md, errors).
"""

from __future__ import annotations

import logging
import re
import sys

from pydantic import ValidationError

from schemas import RequestError, describe_validation_error

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """An error whose message is fit for the caller: it names what was wrong, and no secret."""


class UserInputError(WorkerError):
    """The request asked for something impossible; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

    def __reduce__(self):  # (raised in a fetching process, re-raised in the worker's)
        return type(self), (self.field, str(self).partition(": ")[2])


class ModelSourceError(UserInputError):
    """The requested model could not be found, fetched or loaded."""


class JobCancelled(WorkerError):
    """RunPod cancelled the job (or it timed out) while it ran."""

    def __init__(self, where: str) -> None:
        super().__init__(f"job: cancelled {where}")


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"]+)\?[^\s'\"]*")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's message, short enough for an answer."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def redact(text: str, secrets: list[str] = ()) -> str:
    """Remove credentials from a message: URL userinfo, signed query strings, known secrets."""
    text = _URL_USERINFO.sub("***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def needs_fresh_worker(exc: BaseException) -> bool:
    """True for failures that leave the GPU in a doubtful state: out of memory, device errors."""
    torch = sys.modules.get("torch")  # no torch loaded means no GPU touched
    if torch is None:
        return False
    return isinstance(exc, (torch.cuda.OutOfMemoryError, torch.AcceleratorError))


def answer_for(exc: BaseException, secrets: list[str] = ()) -> tuple[str, bool]:
    """The caller's error message for ``exc``, and whether to ask RunPod for a fresh worker."""
    if isinstance(exc, ValidationError):
        message = describe_validation_error(exc)
    elif isinstance(exc, (WorkerError, RequestError)):
        message = str(exc)
    elif needs_fresh_worker(exc):
        if isinstance(exc, sys.modules["torch"].cuda.OutOfMemoryError):
            message = "device: out of GPU memory; lower width, height or num_images"
        else:
            message = f"device: the GPU failed ({type(exc).__name__}); this worker will be replaced"
        log.error("device error, asking RunPod for a fresh worker: %s", redact(str(exc), secrets))
    else:
        # A bug of ours, not the caller's: say so without leaking internals, log for the operator.
        message = f"internal: the worker failed ({type(exc).__name__}); the operator's logs have details"
        log.error("internal error: %s: %s", type(exc).__name__, redact(str(exc), secrets))
        log.debug("internal error", exc_info=exc)
    return redact(message, secrets), needs_fresh_worker(exc)

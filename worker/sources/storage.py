"""Objects by URL (model archives, checkpoints): the URL forms, and their bytes streamed in order.

URL forms (docs/models.md): ``https://…`` / ``http://…``; ``s3://bucket/key`` and
``s3:///bucket/key`` (both at the configured endpoint); bare ``s3://`` = the default bucket
(AWS_S3_DEFAULT_BUCKET) with the conventional name ``models--ORG--NAME--PRECISION.tar.zst``;
a key ending in ``/`` gets that name too. A ``#sha256=<hex>`` fragment gives the digest.

``Download.chunks()`` yields the object's bytes in order while fetching ahead in parallel:
ranged GETs for HTTP (here), each resuming from its last good byte after a dropped connection
or a busy reply; boto3's transfer manager for S3 (worker/sources/s3.py). Memory stays
bounded (about concurrency x chunk size).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from ..errors import ModelSourceError, UserInputError
from ..settings import Settings
from .urls import Deadline, PrivateAddress, caused_by, open_url, read_body, session_for

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
_BUSY = {429, 500, 502, 503, 504}  # a store that is busy or briefly unwell: asked again, after a pause


class _Busy(Exception):
    """A reply worth asking again (``_BUSY``)."""


def backoff(failures: int) -> None:
    """The pause before retry number ``failures``: exponential, capped, with jitter."""
    time.sleep(min(0.2 * 2 ** (failures - 1), 8.0) * random.uniform(0.5, 1.0))


class ObjectMissing(ModelSourceError):
    """The object does not exist (yet): an archive can be published there."""


def conventional_name(model_id: str | None, precision: str, field: str, suffix: str = ".tar.zst") -> str:
    """docker-diffusers-api's archive name: models--ORG--NAME--PRECISION.tar.zst."""
    if not model_id or model_id.startswith("/") or "/" not in model_id:
        raise ModelSourceError(field, "a bare s3:// URL needs model.id as a hub id ('org/name') to name the archive")
    org, name = model_id.split("/", 1)
    return f"models--{org}--{name}--{precision}{suffix}"


@dataclass(frozen=True)
class Location:
    """Where an object is. ``display`` is safe to show: no credentials, no query string."""

    scheme: str  # "http" or "s3"
    url: str  # http(s): the URL without its fragment; s3: s3://bucket/key
    bucket: str | None = None
    key: str | None = None
    sha256: str | None = None

    @property
    def display(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.hostname or parts.netloc.rpartition("@")[2], parts.path, "", ""))

    @property
    def name(self) -> str:
        return urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]


def parse_location(
    url: str, field: str, settings: Settings, model_id: str | None, precision: str, suffix: str = ".tar.zst",
    default_name: str | None = None,
) -> Location:
    """``url`` as a Location. A key that is empty or ends in "/" gets ``default_name``, else the
    conventional name built from ``model_id``, ``precision`` and ``suffix``."""
    parts = urlsplit(url)
    sha256 = None
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256" or not _SHA256.match(value.lower()):
            raise ModelSourceError(field, "the only URL fragment understood is #sha256=<64 hex digits>")
        sha256 = value.lower()
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ModelSourceError(field, "URL has no host")
        return Location("http", urlunsplit(parts._replace(fragment="")), sha256=sha256)
    if parts.scheme != "s3":
        raise ModelSourceError(field, f"must be an https://, http:// or s3:// URL, got scheme {parts.scheme!r}")
    if parts.netloc:  # s3://bucket/key
        bucket, key = parts.netloc, parts.path.lstrip("/")
    else:  # s3:///bucket/key, or bare s3://
        bucket, _, key = parts.path.lstrip("/").partition("/")
        if not bucket:
            bucket = settings.aws_s3_default_bucket
            if not bucket:
                raise ModelSourceError(field, "a bare s3:// URL needs AWS_S3_DEFAULT_BUCKET set on the endpoint")
    if not key or key.endswith("/"):
        key += default_name or conventional_name(model_id, precision, field, suffix)
    return Location("s3", f"s3://{bucket}/{key}", bucket=bucket, key=key, sha256=sha256)


class Download(Protocol):
    """The bytes of one object, in order. ``size`` is known before the first chunk. Use it
    in a ``with`` block: leaving it lets go of its connections."""

    size: int | None

    def chunks(self) -> Iterator[bytes]: ...

    def sidecar_sha256(self) -> str | None:
        """The digest in a ``.sha256`` object beside this one, if there is one."""

    def __enter__(self) -> Download: ...

    def __exit__(self, *exc) -> None: ...


def open_download(location: Location, field: str, settings: Settings, *, trusted: bool) -> Download:
    """The object at ``location``. Unless ``trusted`` (the operator's own URL), an HTTP(S)
    download is a request's: public addresses only (unless ALLOW_PRIVATE_URLS) and within its
    deadline (URL_DEADLINE_S, URL_MIN_MB_PER_S). S3 URLs reach the operator's own endpoint."""
    if location.scheme == "s3":
        from .s3 import S3Download

        return S3Download(location, field, settings)
    allow_private = trusted or settings.allow_private_urls
    deadline = Deadline.unlimited(field) if trusted else Deadline.for_request(field, settings)
    return HttpDownload(location, field, settings, allow_private=allow_private, deadline=deadline)


def parse_sidecar(text: str) -> str | None:
    token = (text.split() or [""])[0].lower()  # "<hex>" or sha256sum's "<hex>  name"
    return token if _SHA256.match(token) else None


# --- HTTP: parallel ranged GETs ---


class HttpDownload:
    def __init__(self, location: Location, field: str, settings: Settings, *, allow_private: bool,
                 deadline: Deadline):
        self.field = field
        self.settings = settings
        self.chunk = settings.download_chunk_mb * 2**20
        self.deadline = deadline.__enter__()  # from the first connection to close()
        self.session = session_for(allow_private, pool_size=settings.download_concurrency + 2, deadline=deadline)
        try:
            first = self._probe(location, allow_private)
        except BaseException:
            self.close()
            raise
        self.url = first.url  # after redirects: the ranges go straight there
        self._first = first
        self.ranged = first.status_code == 206
        if self.ranged:
            self.size = int(first.headers["Content-Range"].rpartition("/")[2])
        else:
            self.size = int(first.headers["Content-Length"]) if "Content-Length" in first.headers else None

    def _probe(self, location: Location, allow_private: bool):
        """The first range, which doubles as the probe (presigned URLs allow GET but not HEAD);
        asked again while the server is busy (503, SlowDown...) or the connection fails."""
        failures = 0
        while True:
            try:
                first = open_url(
                    self.session, location.url, self.field, allow_private=allow_private,
                    timeout=self.settings.url_timeout_s, headers={"Range": f"bytes=0-{self.chunk - 1}"},
                    deadline=self.deadline,
                )
                if first.status_code in (200, 206):
                    return first
                first.close()
                if first.status_code not in _BUSY:
                    raise ModelSourceError(self.field, f"{location.display}: HTTP {first.status_code}")
                why = f"HTTP {first.status_code}"
            except UserInputError as exc:
                cause = exc.__context__
                if not isinstance(cause, _RETRYABLE) or caused_by(cause, PrivateAddress):  # (refused: not retried)
                    raise
                why = type(exc.__context__).__name__
            failures += 1
            if failures > self.settings.download_retries:
                raise ModelSourceError(self.field, f"{location.display}: download failed after "
                                       f"{self.settings.download_retries} retries ({why})")
            log.info("%s: %s; asking again", location.display, why)
            backoff(failures)

    def chunks(self) -> Iterator[bytes]:
        try:
            if not self.ranged:  # the server ignores Range: one stream, no resuming
                yield from self._stream_whole(self._first)
                return
            spans = [(start, min(start + self.chunk, self.size) - 1) for start in range(0, self.size, self.chunk)]
            with ThreadPoolExecutor(self.settings.download_concurrency, thread_name_prefix="fetch") as pool:
                pending: deque = deque()
                for i, (start, end) in enumerate(spans):
                    first = self._first if i == 0 else None
                    pending.append(pool.submit(self._fetch_range, start, end, first))
                    # Keep a window of ranges in flight ahead of the one being consumed.
                    while len(pending) > self.settings.download_concurrency:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
        finally:
            self.close()

    def __enter__(self) -> HttpDownload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self, "_first"):
            self._first.close()
        self.session.close()
        self.deadline.__exit__()

    def _stream_whole(self, response) -> Iterator[bytes]:
        try:
            yield from read_body(response, self.deadline, 1 << 20)
        except _RETRYABLE as exc:
            raise ModelSourceError(self.field, f"download interrupted ({type(exc).__name__}); the server "
                                   "does not support ranges, so it cannot resume") from None

    def _fetch_range(self, start: int, end: int, response=None) -> bytearray:
        got = bytearray()
        failures = 0
        while start + len(got) <= end:
            offset = start + len(got)
            self.deadline.check()
            try:
                if response is None:
                    response = self.session.get(
                        self.url, headers={"Range": f"bytes={offset}-{end}"}, stream=True,
                        timeout=self.settings.url_timeout_s,
                    )
                with response:
                    content_range = response.headers.get("Content-Range", "")
                    if response.status_code in _BUSY:
                        raise _Busy(f"HTTP {response.status_code}")
                    if response.status_code != 206 or not content_range.startswith(f"bytes {offset}-"):
                        raise ModelSourceError(self.field, f"bad ranged reply (HTTP {response.status_code})")
                    # Blocks of 256 KiB: when a connection breaks, only the block being read is
                    # lost; smaller ones would cost a Python call per few KiB.
                    for block in read_body(response, self.deadline, 1 << 18):
                        got += block
                response = None
            except (*_RETRYABLE, _Busy) as exc:
                self.deadline.check()
                response = None
                failures += 1
                why = str(exc) if isinstance(exc, _Busy) else type(exc).__name__
                if failures > self.settings.download_retries:
                    raise ModelSourceError(
                        self.field, f"download failed after {self.settings.download_retries} retries ({why})"
                    ) from None
                log.info("range %d-%d stopped at byte %d (%s); resuming", start, end, start + len(got), why)
                backoff(failures)
        del got[end - start + 1:]  # in place: the range's bytes are not copied again
        return got

    def sidecar_sha256(self) -> str | None:
        parts = urlsplit(self.url)
        try:
            with self.session.get(urlunsplit(parts._replace(path=parts.path + ".sha256")), stream=True,
                                  timeout=self.settings.url_timeout_s) as response:
                if response.status_code != 200:
                    return None
                head = response.raw.read(1024, decode_content=True)  # a digest, not whatever they send
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            self.deadline.check()
            return None
        return parse_sidecar(head.decode("ascii", "replace"))

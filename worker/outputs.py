"""Images delivered to S3-compatible storage instead of inline base64.

A job's images are uploaded when its ``output.upload_url`` names a place, or when the job
carries RunPod's ``s3Config`` (the caller's own bucket, beside ``input``):

- where: the bucket and prefix of ``output.upload_url`` (``s3://bucket/prefix/`` or
  ``s3:///bucket/prefix/``); a bare ``s3://``, or an s3Config without ``upload_url``, means the
  s3Config's ``bucketName``. Image *i* is stored as ``{prefix}{job id}-{i}.{format}``.
- with which credentials: the job's s3Config when it has one, else BUCKET_ENDPOINT_URL /
  BUCKET_ACCESS_KEY_ID / BUCKET_SECRET_ACCESS_KEY (RunPod's names), else the AWS_* settings the
  models come from.
- what comes back: each image's ``url`` (``s3://bucket/key``) and ``presigned_url``, an https
  link that works for OUTPUT_URL_EXPIRES_S (default 7 days, the most S3 allows).

An s3Config's endpoint is the caller's: unless ALLOW_PRIVATE_URLS=1 it must resolve to a
public address, like every URL a request brings, checked on its name and again on every
connection, before a byte is sent; and each exchange with it keeps the request deadline
(URL_DEADLINE_S, URL_MIN_MB_PER_S), so a server that answers slowly or not at all cannot
hold the job. With the endpoint's own credentials, images go only under WRITE_DESTINATIONS;
never over an object (worker.destinations).
"""

from __future__ import annotations

import base64
import io
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from pydantic import ValidationError

from schemas import ImageOut, Progress, S3Config

from .errors import UserInputError
from .settings import Settings
from .sources.destinations import NoOverwrite, check_key, check_writable, refuse_existing
from .sources.s3 import s3_client, s3_error
from .sources.storage import Location
from .sources.urls import Deadline, PrivateAddress, caused_by, check_url, private_message, session_for
from .timing import ms_since

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Outbox:
    """Where one job's images go, and the client that puts them there."""

    writer: NoOverwrite  # its client
    bucket: str
    prefix: str  # "" or ending in "/"
    stem: str  # the job id, made safe for a key
    expires_s: int
    field: str  # the request field to name in errors

    def location(self, i: int, fmt: str) -> Location:
        key = f"{self.prefix}{self.stem}-{i}.{fmt}"
        return Location("s3", f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)

    def refuse_taken(self, count: int, fmt: str) -> None:
        """Before the work: fail if an image's key is taken (uploads never overwrite)."""
        for i in range(count):
            refuse_existing(self.writer.client, self.location(i, fmt), self.field)

    def put_all(self, images: list[tuple[bytes, str]],
                emit: Callable[[Progress], None]) -> list[tuple[str, str | None]]:
        """Upload (data, format) pairs in parallel, each only where nothing is; return
        (s3 URL, presigned link) for each."""
        locations = [self.location(i, fmt) for i, (_, fmt) in enumerate(images)]
        done = 0

        def put(location: Location, data: bytes, fmt: str) -> None:
            try:
                self.writer.put(self.field, location.display, lambda: self.writer.client.put_object(
                    Bucket=self.bucket, Key=location.key, Body=data, ContentType=_CONTENT_TYPES[fmt]))
            except UserInputError:
                raise  # already says what and where (a private endpoint, a taken key)
            except Exception as exc:  # botocore's errors, read by s3_error; never a credential
                raise s3_error(exc, self.field, location) from None

        emit(Progress(stage="upload", step=0, total=len(images)))
        with ThreadPoolExecutor(min(len(images), 8) or 1, thread_name_prefix="upload") as pool:
            futures = [pool.submit(put, where, data, fmt) for where, (data, fmt) in zip(locations, images)]
            for future in futures:
                future.result()
                done += 1
                emit(Progress(stage="upload", step=done, total=len(images)))
        return [(where.url, self._presigned(where.key)) for where in locations]

    def _presigned(self, key: str) -> str | None:
        if not self.expires_s:
            return None
        return self.writer.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires_s
        )


def outbox_for(upload_url: str | None, s3_config: Any, job_id: str | None, settings: Settings,
               images: tuple[int, str] = (1, "png")) -> Outbox | None:
    """The job's Outbox, or None when its images come back inline. Raises UserInputError
    naming ``output.upload_url`` or ``s3Config.<key>`` when the destination is unusable: not
    a place requests may write with the endpoint's credentials (destinations), or already
    holding one of the job's ``images`` (how many, in which format)."""
    if upload_url is None and s3_config is None:
        return None
    config = _s3_config(s3_config, settings) if s3_config is not None else None
    field = "output.upload_url" if upload_url else "s3Config.bucketName"

    # 1. Bucket and prefix; images are named after the job.
    stem = _UNSAFE.sub("_", job_id or uuid.uuid4().hex)[:128]
    bucket, prefix = "", ""
    if upload_url:
        parts = urlsplit(upload_url)
        if parts.query or parts.fragment:
            raise UserInputError(field, "must be s3://bucket/prefix/, with no query or fragment")
        if parts.netloc:  # s3://bucket/prefix
            bucket, prefix = parts.netloc, parts.path.lstrip("/")
        else:  # s3:///bucket/prefix, or bare s3://
            bucket, _, prefix = parts.path.lstrip("/").partition("/")
    if not bucket:
        if config is None or not config.bucketName:
            raise UserInputError(field, "names no bucket: send s3://bucket/prefix/, or an s3Config with bucketName")
        bucket = config.bucketName
        prefix = prefix or f"{stem}/"  # RunPod's own layout: one folder per job
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    check_key(f"{prefix}{stem}", field)

    # 2. The client: the job's own bucket, else RunPod's BUCKET_*, else the models' AWS_*.
    if config is not None:
        client = _client(settings, config.endpointUrl, config.accessId, config.accessSecret.get_secret_value(),
                         callers=True)
    elif settings.bucket_endpoint_url or settings.bucket_access_key_id:
        secret = settings.bucket_secret_access_key
        client = _client(settings, settings.bucket_endpoint_url, settings.bucket_access_key_id,
                         secret.get_secret_value() if secret else None)
    else:
        client = s3_client(settings)
    outbox = Outbox(NoOverwrite(client), bucket, prefix, stem, settings.output_url_expires_s, field)
    if config is None:  # the endpoint's credentials: only where the operator lets requests write
        check_writable(outbox.location(0, images[1]), field, settings)
    outbox.refuse_taken(*images)
    return outbox


def _s3_config(raw: Any, settings: Settings) -> S3Config:
    try:
        config = S3Config.model_validate(raw)
    except ValidationError as exc:
        # Said without the values: one of them is a secret.
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserInputError(f"s3Config.{where}" if where else "s3Config", first["msg"].lower()) from None
    check_url(config.endpointUrl, "s3Config.endpointUrl", settings.allow_private_urls)
    return config


def _client(settings: Settings, endpoint: str | None, key_id: str | None, secret: str | None,
            callers: bool = False):
    """An S3 client; ``callers``: for a job's own endpoint (its s3Config), which is checked and
    held to the request deadline like any URL a request brings (``send_through``)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
        region_name=settings.aws_default_region or _region_of(endpoint),
        config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}),
    )
    if callers:
        client.meta.events.register("before-send.s3", send_through(settings))
    return client


class _Body(io.BytesIO):
    """A reply's body, read already, as botocore reads a raw response (``stream``, ``read``)."""

    def stream(self, amt: int = 1 << 16, decode_content: bool | None = None):
        while chunk := self.read(amt):
            yield chunk


def send_through(settings: Settings, field: str = "s3Config.endpointUrl"):
    """A botocore before-send handler for a caller's endpoint: each request goes through a
    requests session of its own whose every connection is checked, on the connected socket,
    before a byte is sent (unless ALLOW_PRIVATE_URLS; a DNS answer can change after the name
    was checked), and whose whole exchange, reply read included, keeps the request deadline:
    URL_DEADLINE_S plus the body's size at URL_MIN_MB_PER_S. A caller's server cannot hold the job."""
    import requests
    from botocore.awsrequest import AWSResponse

    floor = settings.url_min_mb_per_s * 1e6

    def send(request, **kwargs) -> AWSResponse:
        size = len(request.body) if isinstance(request.body, (bytes, bytearray)) else 0
        deadline = Deadline(field, settings.url_deadline_s + (size / floor if floor else 0), 0, what="upload")
        with deadline, session_for(settings.allow_private_urls, deadline=deadline) as session:
            try:
                # botocore's own connection handles "Expect: 100-continue"; requests just sends the body.
                headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}
                response = session.request(request.method, request.url, headers=headers, data=request.body,
                                           stream=True, allow_redirects=False, timeout=settings.url_timeout_s)
                body = response.content
            except requests.RequestException as exc:
                deadline.check()
                if caused_by(exc, PrivateAddress):
                    raise UserInputError(field, private_message(urlsplit(request.url).hostname)) from None
                raise UserInputError(field, f"upload failed ({type(exc).__name__})") from None
            deadline.check()
        return AWSResponse(request.url, response.status_code, response.headers, _Body(body))

    return send


def _region_of(endpoint: str | None) -> str | None:
    """The region in an AWS-style endpoint (s3.eu-west-1.amazonaws.com); presigned links need it."""
    match = re.search(r"\bs3[.-]([a-z]{2}-[a-z]+-\d)\.", endpoint or "")
    return match.group(1) if match else None


def deliver(images: list[ImageOut], encoded: list[bytes], outbox: Outbox | None, settings: Settings,
            emit: Callable[[Progress], None], timings: dict[str, float]) -> None:
    """Each image's bytes uploaded through ``outbox`` (its ``url`` and ``presigned_url`` set),
    or, without one, inlined as base64 within the endpoint's result limit."""
    if outbox is not None:
        start = time.perf_counter()
        placed = outbox.put_all([(data, image.format) for data, image in zip(encoded, images)], emit)
        for image, (url, link) in zip(images, placed):
            image.url, image.presigned_url = url, link
        timings["upload"] = ms_since(start)
        return
    size = sum((len(data) + 2) // 3 * 4 for data in encoded)
    if size > settings.max_result_bytes:
        raise UserInputError(
            "output", f"the images come to {size / 2**20:.1f} MB of base64, over this endpoint's "
            f"{settings.max_result_bytes / 2**20:.1f} MB result limit; ask for fewer or smaller "
            "images, output.format jpeg / webp, or an output.upload_url"
        )
    for image, data in zip(images, encoded):
        image.base64 = base64.b64encode(data).decode("ascii")

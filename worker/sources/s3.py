"""S3 objects: the boto3 client the worker uses, its errors as callers should read them, and
``S3Download``, an object's bytes in order through boto3's transfer manager (parallel parts,
retried by botocore's standard mode, SlowDown included)."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from ..errors import ModelSourceError
from ..settings import Settings
from .storage import Location, ObjectMissing, parse_sidecar


def s3_client(settings: Settings):
    import boto3
    from botocore.config import Config

    secret = settings.aws_secret_access_key
    return boto3.client(
        "s3",
        endpoint_url=settings.aws_s3_endpoint_url,  # None: boto3's own AWS_ENDPOINT_URL(_S3) handling
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        region_name=settings.aws_default_region,
        config=Config(
            signature_version="s3v4",  # presigned links too: SigV2's would be refused by newer regions
            max_pool_connections=settings.download_concurrency + 4,
            retries={"max_attempts": settings.download_retries + 1, "mode": "standard"},
        ),
    )


def error_code(exc: Exception) -> str | None:
    """The S3 error code of a boto error (``NoSuchKey``, ``PreconditionFailed`` ...), also when
    boto3 wraps the reply (S3UploadFailedError); None for what is not a reply (a dropped connection)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        exc = exc.__cause__ or exc.__context__
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else None


def s3_error(exc: Exception, field: str, location: Location) -> ModelSourceError:
    """A boto error as the caller should read it: what and where, never a credential."""
    code = error_code(exc)
    if code is not None:
        if code in ("404", "NoSuchKey", "NotFound"):
            return ObjectMissing(field, f"{location.display} does not exist")
        if code in ("NoSuchBucket",):
            return ModelSourceError(field, f"bucket {location.bucket!r} does not exist")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ModelSourceError(field, f"access to {location.display} denied; check the endpoint's AWS credentials")
        return ModelSourceError(field, f"S3 refused {location.display} ({code or 'error'})")
    return ModelSourceError(field, f"S3 request for {location.display} failed ({type(exc).__name__})")


_IO_CHUNK = 1 << 20


class S3Download:
    _DONE = object()

    def __init__(self, location: Location, field: str, settings: Settings):
        from botocore.exceptions import BotoCoreError, ClientError

        self.location, self.field, self.settings = location, field, settings
        self.client = s3_client(settings)
        try:
            self.size = self.client.head_object(Bucket=location.bucket, Key=location.key)["ContentLength"]
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, field, location) from None

    def chunks(self) -> Iterator[bytes]:
        from boto3.s3.transfer import TransferConfig

        chunks: queue.Queue = queue.Queue(maxsize=self.settings.download_concurrency * 4)  # of _IO_CHUNK
        stop = threading.Event()

        class Sink:  # not seekable, so the transfer manager writes the parts in order
            def write(self, data: bytes) -> int:
                if stop.is_set():
                    raise InterruptedError("download abandoned")
                chunks.put(bytes(data))
                return len(data)

        def download() -> None:
            chunk = self.settings.download_chunk_mb * 2**20
            config = TransferConfig(
                multipart_threshold=chunk, multipart_chunksize=chunk,
                max_concurrency=self.settings.download_concurrency,
                num_download_attempts=self.settings.download_retries + 1,
                io_chunksize=_IO_CHUNK,  # (boto3's 256 KiB costs a Python call per few hundred KiB)
            )
            try:
                self.client.download_fileobj(self.location.bucket, self.location.key, Sink(), Config=config)
                chunks.put(self._DONE)
            except Exception as exc:  # handed to the consumer, who raises it
                chunks.put(exc)

        thread = threading.Thread(target=download, name="s3-fetch", daemon=True)
        thread.start()
        try:
            while (item := chunks.get()) is not self._DONE:
                if isinstance(item, Exception):
                    raise s3_error(item, self.field, self.location)
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a writer waiting on a full queue
                try:
                    chunks.get(timeout=0.1)
                except queue.Empty:
                    pass

    def __enter__(self) -> S3Download:
        return self

    def __exit__(self, *exc) -> None:
        pass  # chunks() lets go of its transfer thread itself

    def sidecar_sha256(self) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.location.bucket, Key=self.location.key + ".sha256")["Body"]
            return parse_sidecar(body.read(1024).decode("ascii", "replace"))
        except (ClientError, BotoCoreError):
            return None

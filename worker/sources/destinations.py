"""Where a request may write on S3-compatible storage, and writing there without overwriting.

A request can make the worker write: its images (``output.upload_url``), a converted model
(``convert.dest_url``), a trained LoRA or model (``train.dest_url``), an archive it publishes
because ``model.url`` names one that is not there yet (auto-publish). Callers are untrusted (an
endpoint's caller is often a web app passing its own users' input through), so:

1. With the operator's credentials, only under WRITE_DESTINATIONS (``s3://bucket/prefix/``
   places; by default the whole of AWS_S3_DEFAULT_BUCKET). A job's own ``s3Config`` is the
   caller's own bucket and credentials: its images may go anywhere in it.
2. Never over an existing object: checked before the work and again right before the upload,
   which is also conditional (``If-None-Match: *``) where the store honours that, so that
   even a race loses nothing.
3. Plain keys: no empty, ``.`` or ``..`` part, and no ``.sha256`` (the worker writes those
   beside what it publishes, and fetches trust them).
4. A conventional name (``models--ORG--NAME--PRECISION.tar.zst``) holds what it names: a
   request publishes it only as the archive of hub repo ORG/NAME itself, at its default
   revision, in that precision. The operator's own MODEL_URL and CHECKPOINT_URL are never a
   request's destination.

The operator's own writes (``python -m worker.convert``, the default model's auto-publish)
are trusted with 1, 3 and 4; 2 holds for them too.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Collection
from urllib.parse import urlsplit

from ..errors import UserInputError
from ..settings import Settings
from .s3 import error_code
from .storage import Location, conventional_name

log = logging.getLogger(__name__)

_CONVENTIONAL = re.compile(r"^models--.+--.+--(fp32|fp16|bf16)(--no-t5)?\.tar(\.zst)?(\.sha256)?$")
_EXISTS = ("PreconditionFailed", "412", "ConditionalRequestConflict")


def check_key(key: str, field: str) -> None:
    """Raise unless ``key`` is a plain object key a request may name."""
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UserInputError(field, f"{key!r}: a key has no empty, '.' or '..' parts")
    if key.endswith(".sha256"):
        raise UserInputError(field, "names a .sha256 digest: the worker writes those itself, beside what it publishes")


def check_writable(location: Location, field: str, settings: Settings, *, publishes: Collection[str] = ()) -> None:
    """Raise unless a request may write ``location`` with the operator's credentials.

    ``publishes``: the conventional names this job may take (it publishes that hub repo)."""
    check_key(location.key, field)
    name = location.key.rsplit("/", 1)[-1]
    if _CONVENTIONAL.match(name) and name not in publishes:
        raise UserInputError(field, f"{name} is the conventional name of a hub model's archive: a request "
                                    "publishes it only from that hub repo itself, at its default revision, in that "
                                    "precision (convert or auto-publish of model.id); choose another name")
    if (location.bucket, location.key) in operator_objects(settings):
        raise UserInputError(field, f"{location.display} is where this endpoint's own model comes from")
    places = settings.write_places
    if not any(location.bucket == bucket and location.key.startswith(prefix) for bucket, prefix in places):
        where = ", ".join(f"s3://{bucket}/{prefix}" for bucket, prefix in places) or "none"
        raise UserInputError(field, f"{location.display} is not where this endpoint lets requests write "
                                    f"(WRITE_DESTINATIONS: {where})")


def hub_names(model_id: str | None, precision: str, suffix: str, *, from_hub: bool,
              lean: bool | None = None) -> set[str]:
    """The conventional names an archive of ``model_id`` may take when it is built from that
    hub repo at its default revision (``from_hub``): its own, or (``lean``) its --no-t5 form,
    or either while that is not known yet (None)."""
    if not from_hub or not model_id or model_id.startswith(("/", "url:", "embedded:")):
        return set()
    extras = {None: ("", "--no-t5"), False: ("",), True: ("--no-t5",)}[lean]
    return {conventional_name(model_id, precision, "", extra + suffix) for extra in extras}


def operator_objects(settings: Settings) -> set[tuple[str, str]]:
    """The S3 objects the operator's MODEL_URL and CHECKPOINT_URL name (and their digests)."""
    found = set()
    for url in (settings.model_url, settings.checkpoint_url):
        parts = urlsplit(url or "")
        if parts.scheme == "s3":
            path = f"{parts.netloc}{parts.path}" if parts.netloc else parts.path.lstrip("/")  # s3:// or s3:///
            bucket, _, key = path.partition("/")
            if key and not key.endswith("/"):  # the bare forms take conventional names, guarded above
                found |= {(bucket, key), (bucket, key + ".sha256")}
    return found


def refuse_existing(client: Any, location: Location, field: str, *, sidecar: bool = False) -> None:
    """Raise if the object (or, with ``sidecar``, its ``.sha256``) exists. Where the store
    will not say (403 without the right to list, an error), the conditional upload decides."""
    from botocore.exceptions import BotoCoreError, ClientError

    for key in (location.key, location.key + ".sha256") if sidecar else (location.key,):
        try:
            client.head_object(Bucket=location.bucket, Key=key)
        except (ClientError, BotoCoreError):
            continue
        raise exists(field, f"s3://{location.bucket}/{key}")


class ObjectExists(UserInputError):
    """The destination is taken: nothing was written."""


def exists(field: str, where: str) -> ObjectExists:
    return ObjectExists(field, f"{where} already exists, and requests never overwrite: choose another key "
                               "(or delete it first)")


class NoOverwrite:
    """Uploads through ``client`` that create only, never replace: S3's ``If-None-Match: *`` on
    PutObject and on CompleteMultipartUpload (which makes a multipart upload's object). A store
    that rejects the header as not implemented gets the upload again without it: the object
    was checked absent just before (``refuse_existing``)."""

    def __init__(self, client: Any):
        self.client = client
        self.conditional = True
        for operation in ("PutObject", "CompleteMultipartUpload"):
            client.meta.events.register(f"before-parameter-build.s3.{operation}", self._add_condition)

    def _add_condition(self, params: dict, **kwargs) -> None:
        if self.conditional:
            params.setdefault("IfNoneMatch", "*")

    def put(self, field: str, where: str, upload: Callable[[], Any]) -> Any:
        """Run ``upload`` (a put on this client); raise ObjectExists if ``where`` is taken."""
        try:
            return upload()
        except Exception as exc:
            code = error_code(exc)
            if code in _EXISTS:
                raise exists(field, where) from None
            if code != "NotImplemented":
                raise
        log.info("the store does not implement conditional writes; %s was checked absent just before", where)
        self.conditional = False
        return upload()

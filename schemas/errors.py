"""Turn pydantic's validation errors into the contract's one-line error: `field: what, got X`."""

from __future__ import annotations

import re
from typing import Callable

from pydantic import ValidationError

_NESTED_RULE = re.compile(r"^[a-z_][a-z0-9_]*: ")
_MAX_SHOWN = 60  # characters of an offending value quoted back (base64 images are long)


def _where(loc: tuple) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc]
    return ".".join(parts).replace(".[", "[") or "input"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def describe_validation_error(exc: ValidationError) -> str:
    messages = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"] and ": " in msg:
            messages.append(msg)  # a cross-field rule: its message names the fields
            continue
        where = _where(err["loc"])
        if err["type"] == "value_error" and _NESTED_RULE.match(msg):
            messages.append(f"{where}.{msg}")  # a nested object's cross-field rule, naming its field
            continue
        if err["type"] == "model_type":
            messages.append(f"{where}: must be a JSON object, got {_shown(err.get('input'))}")
        elif err["type"] == "extra_forbidden":
            messages.append(f"{where}: unknown field")
        elif err["type"] == "missing":
            messages.append(f"{where}: required")
        elif "got " in msg:
            messages.append(f"{where}: {msg}")
        else:
            messages.append(f"{where}: {msg[:1].lower()}{msg[1:]}, got {_shown(err.get('input'))}")
    return "; ".join(messages)


def renamed(message: str, rename: Callable[[str], str]) -> str:
    """``message`` (one or several ``field: what`` parts) with each field as ``rename`` has it:
    another API's name for it, for a client that sent that API's payload."""
    parts = []
    for part in message.split("; "):
        field, sep, rest = part.partition(": ")
        parts.append(f"{rename(field)}{sep}{rest}" if sep and " " not in field else part)
    return "; ".join(parts)

"""Build a request's scheduler from the table in schemas.schedulers."""

from __future__ import annotations

from typing import Any

import diffusers

from schemas import SCHEDULERS


def make_scheduler(name: str | None, model_scheduler: Any) -> Any:
    """A fresh scheduler for one job: ``name`` from the table, or a copy of the model's own.

    Schedulers keep state between steps, so every job gets its own instance and nothing one
    request chose can leak into the next.
    """
    if name is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    spec = SCHEDULERS[name]
    return getattr(diffusers, spec.cls).from_config(model_scheduler.config, **spec.config)

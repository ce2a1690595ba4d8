"""Build a request's scheduler from the table in schemas.schedulers."""

from __future__ import annotations

from typing import Any

import diffusers

from schemas import SCHEDULERS
from schemas.schedulers import is_flow_matching

from .errors import UserInputError


def make_scheduler(name: str | None, model_scheduler: Any) -> Any:
    """A fresh scheduler for one job: ``name`` from the table, or a copy of the model's own.

    Schedulers keep state between steps, so every job gets its own instance and nothing one
    request chose can leak into the next. A flow-matching model (SD3) takes only flow-matching
    schedulers, and the others only the others: a mismatch would denoise into garbage.
    """
    if name is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    spec = SCHEDULERS[name]
    flow = is_flow_matching(type(model_scheduler).__name__)
    if is_flow_matching(spec.cls) != flow:
        fitting = [n for n, s in SCHEDULERS.items() if is_flow_matching(s.cls) == flow]
        kind = "a flow-matching model (SD3)" if flow else "a diffusion model (SD 1.x, 2.x, XL)"
        raise UserInputError("scheduler", f"{name} cannot sample this model, {kind}: use one of {', '.join(fitting)}")
    return getattr(diffusers, spec.cls).from_config(model_scheduler.config, **spec.config)

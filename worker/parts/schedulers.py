"""Build a request's scheduler from the table in schemas.schedulers."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers

from schemas import SCHEDULERS
from schemas.schedulers import FLOW_PLAIN_SCHEDULES, FLOW_TWINS, SCHEDULES, is_flow_matching

from ..errors import UserInputError


def make_scheduler(name: str | None, model_scheduler: Any, schedule: str | None = None, *, family: Any) -> Any:
    """A fresh scheduler for one job: ``name`` from the table, or a copy of the model's own;
    with ``schedule``, its steps spaced that way.

    Schedulers keep state between steps, so every job gets its own instance and nothing one
    request chose can leak into the next. A flow-matching ``family`` takes only flow-matching
    schedulers (Euler and Heun: their flow-matching twins), and the others only the others: a
    mismatch would denoise into garbage.
    """
    cls, overrides = type(model_scheduler), {}
    if family.flow_matching:
        name = FLOW_TWINS.get(name, name)
        schedule = None if schedule in FLOW_PLAIN_SCHEDULES else schedule
    if name is not None:
        spec = SCHEDULERS[name]
        flow = family.flow_matching
        if is_flow_matching(spec.cls) != flow:
            fitting = [n for n, s in SCHEDULERS.items() if is_flow_matching(s.cls) == flow]
            kind = f"a flow-matching model ({family.name})" if flow else f"a diffusion model ({family.name})"
            raise UserInputError("scheduler",
                                 f"{name} cannot sample this model, {kind}: use one of {', '.join(fitting)}")
        cls, overrides = getattr(diffusers, spec.cls), spec.config
    if schedule is not None:
        overrides = overrides | _spaced(cls, name, overrides, schedule)
    return cls.from_config(model_scheduler.config, **overrides)


def _spaced(cls: type, name: str | None, overrides: dict, schedule: str) -> dict:
    """The config that gives ``cls`` the ``schedule`` (and no other): diffusers would take an
    option a scheduler does not have as an unknown key and ignore it."""
    flags = SCHEDULES[schedule]
    if any(key in overrides for key in flags.keys() | {"use_karras_sigmas"}):
        raise UserInputError("schedule", f"{name} comes with its own schedule: send it without schedule, or "
                                         f"its plain sampler with schedule {schedule!r}")
    known = inspect.signature(cls.__init__).parameters
    if not flags.keys() <= known.keys():
        what = name or "this model's scheduler"
        raise UserInputError("schedule", f"{what} ({cls.__name__}) has no {schedule} schedule")
    sigmas = {key: False for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if key in known}
    return sigmas | flags

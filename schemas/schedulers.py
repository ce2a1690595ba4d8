"""The scheduler table: one map from request names to diffusers classes, used twice.

The schema validates ``scheduler`` against it and the worker builds the scheduler from it,
so a name is accepted exactly when it can be built. Torch-free: classes are named, not imported.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class SchedulerSpec(NamedTuple):
    cls: str  # diffusers class name
    config: dict[str, Any]  # overrides on top of the model's own scheduler config


SCHEDULERS: dict[str, SchedulerSpec] = {
    "DPMSolverMultistep": SchedulerSpec("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistepKarras": SchedulerSpec("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPMSolverSinglestep": SchedulerSpec("DPMSolverSinglestepScheduler", {}),
    "KDPM2Discrete": SchedulerSpec("KDPM2DiscreteScheduler", {}),
    "KDPM2AncestralDiscrete": SchedulerSpec("KDPM2AncestralDiscreteScheduler", {}),
    "EulerDiscrete": SchedulerSpec("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscrete": SchedulerSpec("EulerAncestralDiscreteScheduler", {}),
    "HeunDiscrete": SchedulerSpec("HeunDiscreteScheduler", {}),
    "LMSDiscrete": SchedulerSpec("LMSDiscreteScheduler", {}),
    "DDIM": SchedulerSpec("DDIMScheduler", {}),
    "DDPM": SchedulerSpec("DDPMScheduler", {}),
    # skip_prk_steps: PNDM's Runge-Kutta warm-up needs more steps than short runs have.
    "PNDM": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPCMultistep": SchedulerSpec("UniPCMultistepScheduler", {}),
    "LCM": SchedulerSpec("LCMScheduler", {}),
    # Flow matching (SD3): these two only, and only these for such models.
    "FlowMatchEulerDiscrete": SchedulerSpec("FlowMatchEulerDiscreteScheduler", {}),
    "FlowMatchHeunDiscrete": SchedulerSpec("FlowMatchHeunDiscreteScheduler", {}),
}

# The diffusers class names are accepted too (docker-diffusers-api sent those); each maps to
# the first table entry that uses the class.
_ALIASES = {spec.cls: name for name, spec in reversed(SCHEDULERS.items())}


def is_flow_matching(cls: str) -> bool:
    """Whether a scheduler class samples a flow-matching model (SD3), which the others cannot."""
    return cls.startswith("FlowMatch")


def canonical_scheduler(name: str) -> str:
    """The table name for ``name`` (a table name or a diffusers class name); ValueError if none."""
    if name in SCHEDULERS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ValueError(f"must be one of {', '.join(SCHEDULERS)}, got {name!r}")

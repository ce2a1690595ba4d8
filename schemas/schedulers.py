"""The scheduler table: one map from request names to diffusers classes, used twice.

The schema validates ``scheduler`` against it and the worker builds the scheduler from it,
so a name is accepted exactly when it can be built. Torch-free: classes are named, not imported.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class SchedulerSpec(NamedTuple):
    cls: str  # diffusers class name
    config: dict[str, Any]  # overrides on top of the model's own scheduler config


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "DPMSolverMultistep": SchedulerSpec("DPMSolverMultistepScheduler", {}),
    "DPMSolverMultistepKarras": SchedulerSpec("DPMSolverMultistepScheduler", _KARRAS),
    "DPMSolverMultistepSDE": SchedulerSpec("DPMSolverMultistepScheduler", _SDE),
    "DPMSolverMultistepSDEKarras": SchedulerSpec("DPMSolverMultistepScheduler", _SDE | _KARRAS),
    "DPMSolverSinglestep": SchedulerSpec("DPMSolverSinglestepScheduler", {}),
    "DPMSolverSinglestepKarras": SchedulerSpec("DPMSolverSinglestepScheduler", _KARRAS),
    "KDPM2Discrete": SchedulerSpec("KDPM2DiscreteScheduler", {}),
    "KDPM2DiscreteKarras": SchedulerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "KDPM2AncestralDiscrete": SchedulerSpec("KDPM2AncestralDiscreteScheduler", {}),
    "KDPM2AncestralDiscreteKarras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "EulerDiscrete": SchedulerSpec("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscrete": SchedulerSpec("EulerAncestralDiscreteScheduler", {}),
    "HeunDiscrete": SchedulerSpec("HeunDiscreteScheduler", {}),
    "LMSDiscrete": SchedulerSpec("LMSDiscreteScheduler", {}),
    "LMSDiscreteKarras": SchedulerSpec("LMSDiscreteScheduler", _KARRAS),
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

# AUTOMATIC1111's sampler names, as diffusers' documentation maps them to its schedulers. A
# sampler name ending in Karras is the plain one with the Karras schedule.
A1111_SAMPLERS = {
    "DPM++ 2M": "DPMSolverMultistep", "DPM++ 2M Karras": "DPMSolverMultistepKarras",
    "DPM++ 2M SDE": "DPMSolverMultistepSDE", "DPM++ 2M SDE Karras": "DPMSolverMultistepSDEKarras",
    "DPM++ SDE": "DPMSolverSinglestep", "DPM++ SDE Karras": "DPMSolverSinglestepKarras",
    "DPM2": "KDPM2Discrete", "DPM2 Karras": "KDPM2DiscreteKarras",
    "DPM2 a": "KDPM2AncestralDiscrete", "DPM2 a Karras": "KDPM2AncestralDiscreteKarras",
    "Euler": "EulerDiscrete", "Euler a": "EulerAncestralDiscrete", "Heun": "HeunDiscrete",
    "LMS": "LMSDiscrete", "LMS Karras": "LMSDiscreteKarras", "DDIM": "DDIM", "PLMS": "PNDM",
    "UniPC": "UniPCMultistep", "LCM": "LCM",
}

# Schedule types (AUTOMATIC1111's, in lower case): how the steps' noise levels are spaced, on top
# of any sampler that has them. sgm_uniform (and simple, the same in diffusers) is what SDXL
# Turbo, Lightning and Hyper-SD were distilled for.
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": _KARRAS,
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
}


# On a flow-matching model, the sampler names that have a flow-matching twin are read as it, as
# Forge and ComfyUI read them ("Euler" on FLUX.1 is flow-matching Euler), and the schedules that
# only space steps evenly are the model's own spacing.
FLOW_TWINS = {"EulerDiscrete": "FlowMatchEulerDiscrete", "HeunDiscrete": "FlowMatchHeunDiscrete"}
FLOW_PLAIN_SCHEDULES = {"simple", "sgm_uniform"}


def is_flow_matching(cls: str) -> bool:
    """Whether a scheduler class samples a flow-matching model (SD3), which the others cannot."""
    return cls.startswith("FlowMatch")


def canonical_scheduler(name: str) -> str:
    """The table name for ``name`` (a table name, a diffusers class name or an AUTOMATIC1111
    sampler name); ValueError if none."""
    for names in (SCHEDULERS, _ALIASES, A1111_SAMPLERS):
        if name in names:
            return name if names is SCHEDULERS else names[name]
    raise ValueError(f"must be one of {', '.join(SCHEDULERS)} (or AUTOMATIC1111's name: "
                     f"{', '.join(A1111_SAMPLERS)}), got {name!r}")


def a1111_name(cls: str, config: dict[str, Any]) -> tuple[str, str | None]:
    """What AUTOMATIC1111 calls a scheduler of class ``cls`` with ``config``: its sampler name
    (the table's when it has none) and its schedule type, if not the plain one."""
    def fits(spec: SchedulerSpec) -> bool:
        return spec.cls == cls and all(config.get(k) == v for k, v in spec.config.items() if k not in _KARRAS)

    candidates = [name for name, spec in SCHEDULERS.items() if fits(spec) and not _KARRAS.keys() & spec.config.keys()]
    if not candidates:
        return cls.removesuffix("Scheduler"), None
    name = max(candidates, key=lambda n: len(SCHEDULERS[n].config))  # DPM++ 2M SDE over DPM++ 2M
    twin = next((plain for plain, flow in FLOW_TWINS.items() if flow == name), name)  # (Euler, on FLUX.1 too)
    sampler = next((a1111 for a1111, table in A1111_SAMPLERS.items() if table == twin), name)
    schedule = next((kind for kind, flags in SCHEDULES.items() if all(config.get(k) == v for k, v in flags.items())),
                    None)
    return sampler, {"karras": "Karras", "exponential": "Exponential", "beta": "Beta"}.get(
        schedule, "SGM Uniform" if schedule else None)

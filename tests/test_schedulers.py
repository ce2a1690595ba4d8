"""Samplers by AUTOMATIC1111's names and schedule types (schemas/schedulers.py,
worker/schedulers.py): what a name means, how the steps are spaced, and what is refused."""

from __future__ import annotations

import diffusers
import pytest

from schemas import SCHEDULERS, a1111_name, canonical_scheduler, parse_request
from schemas.schedulers import A1111_SAMPLERS
from tests.helpers import decode
from worker.errors import UserInputError, answer_for
from worker.families.sd3 import SD3
from worker.families.sdxl import SDXL as XL
from worker.parts.schedulers import make_scheduler

# SDXL's own scheduler config, which the schedule types are relative to.
SDXL = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, timestep_spacing="leading")


def test_automatic1111_sampler_names_are_the_schedulers_diffusers_maps_them_to(engine):
    limits = engine.settings.limits
    for a1111, expected in [("DPM++ 2M Karras", "DPMSolverMultistepKarras"), ("Euler a", "EulerAncestralDiscrete"),
                            ("DPM++ 2M SDE", "DPMSolverMultistepSDE"), ("PLMS", "PNDM"), ("DDIM", "DDIM")]:
        assert parse_request({"prompt": "p", "scheduler": a1111}, limits).scheduler == expected
    assert set(A1111_SAMPLERS.values()) <= SCHEDULERS.keys()
    with pytest.raises(Exception, match="DPM\\+\\+ 2M Karras"):  # the error lists them
        canonical_scheduler("Euler b")
    # And back: each scheduler built from the table is named as AUTOMATIC1111 names it, with a
    # Karras sampler as its plain one plus the Karras schedule type (A1111 1.9's way).
    for a1111, name in A1111_SAMPLERS.items():
        scheduler = make_scheduler(name, SDXL, family=XL)
        plain = a1111.removesuffix(" Karras")
        assert a1111_name(type(scheduler).__name__, scheduler.config) == (
            plain, "Karras" if a1111.endswith("Karras") else None), a1111


def test_sgm_uniform_spaces_the_steps_as_turbo_and_lightning_models_expect():
    """SDXL Lightning / Turbo / Hyper-SD were distilled for steps that start at the last
    training timestep ("trailing", A1111's SGM Uniform); SDXL's own config starts lower."""
    plain = make_scheduler("EulerDiscrete", SDXL, family=XL)
    plain.set_timesteps(4)
    assert plain.timesteps.tolist() == [751, 501, 251, 1]
    for schedule in ("sgm_uniform", "simple"):
        spaced = make_scheduler("EulerDiscrete", SDXL, schedule, family=XL)
        spaced.set_timesteps(4)
        assert spaced.timesteps.tolist() == [999, 749, 499, 249]
    assert a1111_name("EulerDiscreteScheduler", spaced.config) == ("Euler", "SGM Uniform")
    # The model's own scheduler takes a schedule too.
    own = make_scheduler(None, SDXL, "sgm_uniform", family=XL)
    own.set_timesteps(4)
    assert type(own) is diffusers.EulerDiscreteScheduler and own.timesteps.tolist()[0] == 999


def test_sigma_schedules_replace_each_other():
    karras = make_scheduler("DPMSolverMultistep", SDXL, "karras", family=XL)
    karras.set_timesteps(6)
    plain = make_scheduler("DPMSolverMultistep", SDXL, family=XL)
    plain.set_timesteps(6)
    assert karras.config.use_karras_sigmas and karras.sigmas.tolist() != plain.sigmas.tolist()
    # A model whose own scheduler is Karras: asking for exponential is exponential alone (two
    # at once would be refused by diffusers).
    exponential = make_scheduler(None, karras, "exponential", family=XL)
    assert (exponential.config.use_exponential_sigmas, exponential.config.use_karras_sigmas) == (True, False)
    assert a1111_name(type(exponential).__name__, exponential.config) == ("DPM++ 2M", "Exponential")
    assert make_scheduler(None, karras, "beta", family=XL).config.use_beta_sigmas


@pytest.mark.parametrize("name, base, schedule, message", [
    ("DDIM", SDXL, "karras", "schedule: DDIM (DDIMScheduler) has no karras schedule"),
    ("EulerAncestralDiscrete", SDXL, "beta",
     "schedule: EulerAncestralDiscrete (EulerAncestralDiscreteScheduler) has no"),
    ("DPMSolverMultistepKarras", SDXL, "exponential", "schedule: DPMSolverMultistepKarras comes with its own schedule"),
    ("FlowMatchHeunDiscrete", diffusers.FlowMatchEulerDiscreteScheduler(), "karras",
     "schedule: FlowMatchHeunDiscrete (FlowMatchHeunDiscreteScheduler) has no karras schedule"),
])
def test_a_schedule_a_scheduler_does_not_have_is_refused_by_name(name, base, schedule, message):
    """diffusers would take the option as an unknown config key, warn, and ignore it."""
    with pytest.raises(UserInputError) as info:
        make_scheduler(name, base, schedule, family=SD3 if "FlowMatch" in type(base).__name__ else XL)
    assert str(info.value).startswith(message), str(info.value)


def test_on_a_flow_matching_model_euler_and_heun_are_their_flow_matching_twins():
    """As Forge and ComfyUI read them: "Euler" on SD3 or FLUX.1 is flow-matching Euler, and
    the simple / sgm_uniform schedules are the model's own spacing."""
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert type(make_scheduler("EulerDiscrete", flow, family=SD3)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(make_scheduler("HeunDiscrete", flow, family=SD3)).__name__ == "FlowMatchHeunDiscreteScheduler"
    assert dict(make_scheduler("EulerDiscrete", flow, "simple", family=SD3).config) == dict(flow.config)
    assert a1111_name("FlowMatchEulerDiscreteScheduler", flow.config) == ("Euler", None)
    with pytest.raises(UserInputError, match=r"^scheduler: EulerAncestralDiscrete cannot sample this model"):
        make_scheduler("EulerAncestralDiscrete", flow, family=SD3)


def test_a1111_samplers_and_schedules_in_a_job(run, engine):
    def draw(**fields):
        result, _ = run(prompt="a lighthouse", seed=8, num_inference_steps=4, output={"metadata": True}, **fields)
        return result.images[0].base64

    sde = draw(scheduler="DPM++ 2M SDE Karras")
    assert sde == draw(scheduler="DPMSolverMultistepSDE", schedule="karras") == draw(scheduler="DPM++ 2M SDE Karras")
    assert sde != draw(scheduler="DPM++ 2M Karras")  # the SDE sampler draws noise of its own, seeded
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale" in decode(sde).text["parameters"]
    assert draw(scheduler="Euler", schedule="sgm_uniform") != draw(scheduler="Euler")
    with pytest.raises(UserInputError, match="^schedule: DDIM"):
        draw(scheduler="DDIM", schedule="karras")
    assert parse_request({"prompt": "p", "schedule": "SGM Uniform"}, engine.settings.limits).schedule == "sgm_uniform"
    with pytest.raises(Exception) as info:
        parse_request({"prompt": "p", "schedule": "polyexponential"}, engine.settings.limits)
    answer, _ = answer_for(info.value, [])
    assert answer.startswith("schedule: input should be 'karras', 'exponential', 'beta'"), answer

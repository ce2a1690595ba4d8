"""Tier 1: request validation and error messages, with no torch import."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from schemas import (
    SCHEDULERS,
    InferenceRequest,
    Limits,
    RequestError,
    canonical_scheduler,
    describe_validation_error,
    parse_request,
)
from tests.helpers import ROOT, png_b64

IMG = png_b64()


def parse(data, limits: Limits | None = None) -> InferenceRequest:
    return InferenceRequest.model_validate(data, context={"limits": limits or Limits()})


def error_of(data, limits: Limits | None = None) -> str:
    with pytest.raises(ValidationError) as info:
        parse(data, limits)
    return describe_validation_error(info.value)


def test_entry_points_import_without_torch():
    code = "import handler, schemas, worker.jobs, worker.settings, worker.errors, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "data, task",
    [
        ({"prompt": "p"}, "txt2img"),
        ({"prompt": "p", "image": IMG}, "img2img"),
        ({"prompt": "p", "image": IMG, "mask_image": IMG}, "inpaint"),
        ({"prompt": "p", "task": "img2img", "image": "https://example.com/a.png"}, "img2img"),
    ],
)
def test_task_is_inferred_from_images(data, task):
    assert parse(data).task == task


def test_defaults():
    request = parse({"prompt": "p", "image": IMG})
    assert (request.strength, request.num_images, request.output.format, request.stream) == (0.8, 1, "png", False)
    assert request.seed is None and request.scheduler is None


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"prompt": "p", "width": 513}, "width: must be a multiple of 8, got 513"),
        ({"prompt": "p", "height": 32}, "height: "),
        ({"prompt": "p", "wdith": 512}, "wdith: unknown field"),
        ({}, "prompt: required"),
        ("a string", "input: must be a JSON object"),
        ({"prompt": 7}, "prompt: "),
        ({"prompt": "p", "seed": -1}, "seed: "),
        ({"prompt": "p", "seed": 2**63}, "seed: "),
        ({"prompt": "p", "num_images": 0}, "num_images: "),
        ({"prompt": "p", "guidance_scale": "lots"}, "guidance_scale: "),
        ({"prompt": "p", "scheduler": "Euler-ish"}, "scheduler: must be one of"),
        ({"prompt": "p", "model": {"precision": "fp8"}}, "model.precision: "),
        ({"prompt": "p", "model": {"id": "not a repo"}}, "model.id: "),
        ({"prompt": "p", "model": {"id": "org/../etc"}}, "model.id: "),
        ({"prompt": "p", "model": {"idd": "a/b"}}, "model.idd: unknown field"),
        ({"prompt": "p", "output": {"format": "gif"}}, "output.format: "),
        ({"prompt": "p", "output": {"quality": 101}}, "output.quality: "),
        ({"prompt": "p", "strength": 0.5}, "strength: not used by task 'txt2img'"),
        ({"prompt": "p", "task": "img2img"}, "image: required for task 'img2img'"),
        ({"prompt": "p", "task": "inpaint", "image": IMG}, "mask_image: required for task 'inpaint'"),
        ({"prompt": "p", "image": "not base64!"}, "image: must be base64"),
        ({"prompt": "p", "image": IMG, "strength": 0.01}, "strength: 0.01 x num_inference_steps 25"),
        ({"prompt": "p", "task": "train"}, "task: 'train' needs its own fields"),
        ({"prompt": "p", "train": {"method": "lora"}}, "train: only with task 'train'"),
        ({"prompt": "p", "convert": {"dest_url": "s3://"}}, "convert: only with task 'convert'"),
        ({"prompt": "p", "model": {"url": "https://h/k", "checkpoint_url": "s3://b/c"}},
         "model.url: with model.checkpoint_url"),
    ],
)
def test_bad_requests_name_the_field(data, expected):
    assert error_of(data).startswith(expected)


def test_operator_limits_apply():
    limits = Limits(max_pixels=256 * 256, max_images=2, max_steps=10)
    assert error_of({"prompt": "p", "num_images": 3}, limits) == "num_images: at most 2 on this endpoint, got 3"
    assert error_of({"prompt": "p", "num_inference_steps": 11}, limits).startswith("num_inference_steps: at most 10")
    assert error_of({"prompt": "p", "width": 512, "height": 512}, limits).startswith("width x height: 512x512")
    parse({"prompt": "p", "num_images": 2, "num_inference_steps": 10, "width": 256, "height": 256}, limits)


def test_error_quotes_long_values_briefly():
    message = error_of({"prompt": "p", "negative_prompt": 12345678901234567890 * 10**80})
    assert message.startswith("negative_prompt: ") and len(message) < 150


def test_a1111_extra_network_tags_are_refused_not_drawn_as_text():
    assert error_of({"prompt": "p", "negative_prompt": "x <LyCO:detail:1>"}).startswith(
        "negative_prompt: <LyCO:detail:1> is AUTOMATIC1111's tag for a file of its web UI; send loras")
    assert parse({"prompt": "a <lora:x:1> sign", "prompt_weighting": False}).prompt == "a <lora:x:1> sign"


def test_scheduler_names_and_class_names():
    assert parse({"prompt": "p", "scheduler": "DDIMScheduler"}).scheduler == "DDIM"
    assert parse({"prompt": "p", "scheduler": "DPMSolverMultistepScheduler"}).scheduler == "DPMSolverMultistep"
    for name in ("DPMSolverMultistep", "EulerDiscrete", "EulerAncestralDiscrete", "DDIM", "PNDM", "LMSDiscrete",
                 "UniPCMultistep", "HeunDiscrete"):  # the contract's minimum
        assert canonical_scheduler(name) == name
    for name, spec in SCHEDULERS.items():
        assert canonical_scheduler(spec.cls) in SCHEDULERS


def _documented_inputs():
    """Every job input shown in README.md and docs/ (JSON blocks with an "input") and test_input.json."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```json\n(.*?)```", page.read_text(), re.S)]
    found = [json.loads(block) for block in blocks if '"input"' in block]
    found.append(json.loads((ROOT / "test_input.json").read_text()))
    return found


def test_documented_examples_validate():
    examples = _documented_inputs()
    assert len(examples) >= 4
    for example in examples:
        parse_request(example["input"], Limits())


def test_default_steps_respect_the_operator_cap():
    assert parse({"prompt": "p"}, Limits(max_steps=10)).num_inference_steps == 10
    assert parse({"prompt": "p"}).num_inference_steps == 25


def test_convert_requests_are_told_apart_by_task():
    request = parse_request({"task": "convert", "model": {"id": "a/b"}, "convert": {"dest_url": "s3://"}}, Limits())
    assert (request.task, request.convert.precision, request.convert.compression) == ("convert", "fp16", "zstd")
    with pytest.raises(ValidationError) as info:
        parse_request({"task": "convert", "convert": {"dest_url": "https://x/y.tar"}}, Limits())
    assert describe_validation_error(info.value).startswith("convert.dest_url: must be an s3:// URL")
    with pytest.raises(ValidationError) as info:
        parse_request({"task": "convert", "prompt": "p", "convert": {"dest_url": "s3://"}}, Limits())
    assert describe_validation_error(info.value) == "prompt: unknown field"


def test_docker_diffusers_api_payloads_translate():
    request = parse_request({
        "callInputs": {"MODEL_ID": "acme/sd", "MODEL_URL": "s3://", "MODEL_PRECISION": "", "MODEL_REVISION": "fp16",
                       "PIPELINE": "StableDiffusionInpaintPipelineLegacy",
                       "SCHEDULER": "EulerAncestralDiscreteScheduler",
                       "safety_checker": False, "xformers_memory_efficient_attention": True},
        "modelInputs": {"prompt": "p", "init_image": png_b64(), "mask_image": png_b64(), "strength": 0.5,
                        "num_images_per_prompt": 2, "seed": 9},
    }, Limits())
    assert request.legacy and request.task == "inpaint" and request.scheduler == "EulerAncestralDiscrete"
    assert (request.model.id, request.model.url, request.model.precision, request.model.revision) == (
        "acme/sd", "s3://", "fp32", "fp16")
    assert (request.num_images, request.seed, request.strength, request.safety_checker) == (2, 9, 0.5, False)
    assert (request.mask_blur, request.keep_unmasked) == (0, False)  # its inpainting: diffusers' own
    assert not parse_request({"prompt": "p"}, Limits()).legacy
    assert parse_request({"callInputs": {}, "modelInputs": {"prompt": "p"}}, Limits()).task == "txt2img"


@pytest.mark.parametrize("revision", ["../../..", "main/../../x", "/etc", ".git", "a//b", "v1..2", "x.lock", "a b"])
def test_a_revision_is_a_git_ref_that_cannot_leave_the_hub_cache(revision):
    """huggingface_hub reads refs/<revision> in its cache as a path: a revision of '..' parts
    read a file outside MODELS_DIR and used what it held as a path."""
    with pytest.raises(ValidationError, match=r"model\.revision\n  Value error, must be a branch, tag or commit"):
        parse_request({"prompt": "p", "model": {"id": "acme/sd", "revision": revision}}, Limits())
    with pytest.raises(RequestError, match=r"^callInputs\.MODEL_REVISION: must be a branch, tag or commit"):
        parse_request({"callInputs": {"MODEL_ID": "acme/sd", "MODEL_REVISION": revision},
                       "modelInputs": {"prompt": "p"}}, Limits())


@pytest.mark.parametrize("revision", ["main", "v1.0", "fp16", "refs/pr/3", "e" * 40, "release_2-b"])
def test_branches_tags_pull_requests_and_commits_are_revisions(revision):
    assert parse_request({"prompt": "p", "model": {"id": "a/b", "revision": revision}}, Limits()).model.revision

"""AUTOMATIC1111 API payloads (schemas/a1111.py), as RunPod's worker-a1111 takes them: the
translation (torch-free), and whole jobs answered in that API's shape."""

from __future__ import annotations

import base64
import json

import pytest

from schemas import InferenceRequest, Limits, parse_request
from schemas.a1111 import is_a1111
from tests.helpers import decode, png_b64, stream
from worker.errors import answer_for
from worker.jobs import JobRunner

# What an A1111 client sends for txt2img, with the defaults its web UI fills in.
TXT2IMG = {
    "prompt": "a lighthouse at dawn", "negative_prompt": "fog", "seed": 9, "subseed": -1, "subseed_strength": 0,
    "batch_size": 2, "n_iter": 1, "steps": 3, "cfg_scale": 6, "width": 64, "height": 64,
    "sampler_name": "DPM++ 2M", "scheduler": "Karras", "restore_faces": False, "tiling": False, "styles": [],
    "denoising_strength": 0.7, "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent",
    "override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": True,
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def error_of(data) -> str:
    with pytest.raises(Exception) as info:
        parse_request(data, Limits(max_steps=50))
    return answer_for(info.value, [])[0]


def test_a1111_payloads_become_this_workers_requests():
    request = parse_request(TXT2IMG, Limits())
    assert request.a1111 is not None and request.task == "txt2img"
    assert (request.prompt, request.negative_prompt, request.seed, request.num_images) == (
        "a lighthouse at dawn", "fog", 9, 2)
    assert (request.num_inference_steps, request.guidance_scale, request.width, request.height) == (3, 6, 64, 64)
    assert (request.scheduler, request.schedule, request.clip_skip) == ("DPMSolverMultistep", "karras", 1)
    assert request.hires is None and request.strength is None and request.output.metadata
    assert request.tiling is False and parse_request(TXT2IMG | {"tiling": True}, Limits()).tiling is True
    assert request.variation is None  # subseed_strength 0
    varied = parse_request(TXT2IMG | {"subseed": 7, "subseed_strength": 0.3}, Limits()).variation
    assert (varied.seed, varied.strength) == (7, 0.3)
    assert parse_request(TXT2IMG | {"subseed_strength": 0.3}, Limits()).variation.seed is None  # -1: random
    assert parse_request(TXT2IMG | {"seed": -1}, Limits()).seed is None  # -1: random, as A1111 has it

    hires = parse_request(TXT2IMG | {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2}, Limits()).hires
    assert (hires.scale, hires.upscaler, hires.steps, hires.strength) == (1.5, "latent", 2, 0.7)
    # The second pass's size instead of hr_scale; the defaults of what is not built here pass.
    sized = TXT2IMG | {"enable_hr": True, "hr_resize_y": 96, "hr_prompt": "", "hr_sampler_name": "Use same sampler",
                       "hr_checkpoint_name": "Use same checkpoint", "seed_resize_from_h": -1, "eta": 1.0}
    assert parse_request(sized, Limits()).hires.scale == 1.5
    own = parse_request(sized | {"hr_prompt": "a castle", "hr_negative_prompt": "fog"}, Limits()).hires
    assert (own.prompt, own.negative_prompt) == ("a castle", None)  # (fog: the payload's own negative prompt)

    img2img = parse_request({
        "init_images": [png_b64()], "mask": png_b64(), "mask_blur": 8, "inpaint_full_res": True,
        "inpaint_full_res_padding": 24, "resize_mode": 1, "denoising_strength": 0.5, "inpainting_fill": 1,
        "inpainting_mask_invert": 1, "prompt": "a red door", "steps": 4,
        "alwayson_scripts": {"controlnet": {"args": [
            {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "weight": 0.6,
             "image": png_b64(), "guidance_start": 0.1, "guidance_end": 0.9},
            {"enabled": False, "model": "control_v11p_sd15_openpose [cab727d4]"}]}},
    }, Limits())
    assert (img2img.task, img2img.strength, img2img.mask_blur, img2img.padding_mask_crop, img2img.resize_mode,
            img2img.mask_invert) == ("inpaint", 0.5, 8, 24, "crop", True)
    [net] = img2img.controlnets
    assert (net.id, net.preprocess, net.scale, net.start, net.end) == (
        "lllyasviel/control_v11p_sd15_canny", "canny", 0.6, 0.1, 0.9)

    # What A1111 names by local file comes in this worker's own fields, in the same payload.
    extra = parse_request(TXT2IMG | {"loras": [{"id": "/models/papercut.safetensors", "scale": 0.7}],
                                     "override_settings": {"sd_model_checkpoint": "acme/sd15"}}, Limits())
    assert extra.loras[0].scale == 0.7 and extra.model.id == "acme/sd15"
    assert parse_request(TXT2IMG | {"override_settings": {"sd_model_checkpoint": "deliberate_v3"}},
                         Limits()).model.id is None  # a web UI file name: the endpoint's own model

    # This worker's own requests and docker-diffusers-api's are not taken for A1111's.
    assert not is_a1111({"prompt": "p", "num_inference_steps": 2, "scheduler": "Euler a"})
    assert not is_a1111({"callInputs": {}, "modelInputs": {"prompt": "p"}})
    # No field of this worker's own makes a request A1111's (tiling and styles did, once both had them).
    assert [field for field in InferenceRequest.model_fields if is_a1111({"prompt": "p", field: None})] == []


@pytest.mark.parametrize("change, expected", [
    ({"steps": 80}, "steps: at most 50 on this endpoint, got 80"),
    ({"cfg_scale": 99}, "cfg_scale: input should be less than or equal to 50"),
    ({"sampler_name": "DPM fast"}, "sampler_name: must be one of"),
    ({"scheduler": "Align Your Steps"}, "scheduler: input should be 'karras'"),
    ({"batch_size": 0}, "batch_size: must be a whole number of at least 1, got 0"),
    ({"restore_faces": True}, "restore_faces: not supported by this worker (send False)"),
    ({"styles": ["cinematic"]}, "styles[0]: no style 'cinematic' on this endpoint (it has: none)"),
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts.ADetailer: not supported by this worker"),
    ({"override_settings": {"sd_hypernetwork": "x"}}, "override_settings.sd_hypernetwork: not supported"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler: Latent or Lanczos here"),
    ({"hello": 1}, "hello: not supported by this worker"),
    ({"width": 65}, "width: must be a multiple of 8, got 65"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 30}},
     "override_settings.CLIP_stop_at_last_layers: input should be less than or equal to 25, got 30"),
    ({"subseed_strength": 2}, "subseed_strength: input should be less than or equal to 1, got 2"),
    ({"subseed": -5, "subseed_strength": 0.5}, "subseed: input should be greater than or equal to 0"),
    ({"subseed_strength": 0.5, "init_images": [png_b64()]}, "subseed_strength: only with task 'txt2img'"),
    ({"enable_hr": True, "hr_resize_x": 96, "hr_resize_y": 128}, "hr_resize_x: 96x128 is another shape than width"),
    ({"enable_hr": True, "hr_resize_x": 32}, "hr_resize_x: makes the second pass 0.5 times the first's size"),
    ({"enable_hr": True, "hr_prompt": "a <lora:detail:1>"}, "hr_prompt: <lora:detail:1> is AUTOMATIC1111's tag"),
    ({"enable_hr": True, "hr_sampler_name": "Euler"}, "hr_sampler_name: not supported by this worker"),
    ({"seed_resize_from_w": 640}, "seed_resize_from_w: not supported by this worker (send -1)"),
    ({"tiling": "yes"}, 'tiling: must be true, false, "x" or "y", got \'yes\''),
    ({"prompt": "a cat <lora:papercut:0.8>"}, "prompt: <lora:papercut:0.8> is AUTOMATIC1111's tag for a file"),
])
def test_a1111_errors_name_the_field_as_the_client_sent_it(change, expected):
    assert error_of(TXT2IMG | change).startswith(expected), error_of(TXT2IMG | change)




def answer(runner: JobRunner, job_input: dict) -> dict:
    return stream(runner, {"id": "a1111", "input": job_input})[-1]


def test_a1111_jobs_answer_in_a1111s_shape_with_the_same_images(runner):
    """images as base64 PNG strings, parameters (the payload) and info (a JSON string with the
    seeds and each image's infotext), as worker-a1111 answers; the images are this worker's
    for the same request, bit for bit."""
    got = answer(runner, TXT2IMG)
    assert got["type"] == "result" and len(got["images"]) == 2 and all(isinstance(i, str) for i in got["images"])
    assert got["parameters"]["sampler_name"] == "DPM++ 2M" and got["parameters"]["steps"] == 3
    info = json.loads(got["info"])
    assert (info["seed"], info["all_seeds"], info["width"], info["height"]) == (9, [9, 10], 64, 64)
    assert (info["all_subseeds"], info["subseed_strength"]) == ([9, 10], 0)  # no variation: any subseed will do
    varied = json.loads(answer(runner, TXT2IMG | {"subseed": 40, "subseed_strength": 0.5})["info"])
    assert (varied["subseed"], varied["all_subseeds"], varied["subseed_strength"]) == (40, [40, 41], 0.5)
    assert "Variation seed: 41, Variation seed strength: 0.5" in varied["infotexts"][1]
    assert info["infotexts"][1].startswith("a lighthouse at dawn\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M, "
                                           "Schedule type: Karras, CFG scale: 6.0, Seed: 10, Size: 64x64")
    ours = answer(runner, {"prompt": "a lighthouse at dawn", "negative_prompt": "fog", "seed": 9, "num_images": 2,
                           "num_inference_steps": 3, "guidance_scale": 6, "width": 64, "height": 64,
                           "scheduler": "DPMSolverMultistep", "schedule": "karras", "clip_skip": 1,
                           "output": {"metadata": True}})
    assert got["images"] == [image["base64"] for image in ours["images"]]
    assert decode(got["images"][0]).format == "PNG"

    inpainted = answer(runner, {"prompt": "a red door", "steps": 2, "seed": 3, "init_images": [png_b64(size=(96, 64))],
                                "mask": png_b64((255, 255, 255), size=(96, 64)), "denoising_strength": 0.6})
    assert decode(inpainted["images"][0]).size == (96, 64)
    assert inpainted["parameters"]["init_images"] is None  # not echoed back: it can be megabytes
    refused = answer(runner, TXT2IMG | {"steps": 0})
    assert refused["error"].startswith("steps: input should be greater than or equal to 1"), refused
    # What the engine refuses is named the client's way too.
    refused = answer(runner, TXT2IMG | {"override_settings": {"CLIP_stop_at_last_layers": 9}})
    # (in A1111's count: its CLIP_stop_at_last_layers is clip_skip + 1, and the tiny model has 2 layers)
    assert refused["error"].startswith("override_settings.CLIP_stop_at_last_layers: at most 2 for"), refused
    assert refused["error"].endswith(", got 9"), refused
    assert base64.b64decode(got["images"][0])[:4] == b"\x89PNG"


def test_random_malformed_a1111_payloads_are_refused_by_name():
    """Any mix of A1111's fields with values of the wrong kind is refused naming a field, never
    an internal error (seeded; torch-free, so thousands are cheap)."""
    import random

    from schemas.a1111 import _HANDLED, _IGNORED, _ONLY_AS_DEFAULT, _OWN

    keys = sorted(_OWN | _HANDLED | _IGNORED | set(_ONLY_AS_DEFAULT) | {"prompt", "width", "height", "loras", "model"})
    values = [None, 0, 1, -1, 2.5, "x", "", [], [1], ["a"], {}, {"a": 1}, {"controlnet": []}, {"controlnet": "x"},
              {"controlnet": {"args": 5}}, {"controlnet": {"args": [1]}}, {"controlnet": {"args": {"x": 1}}},
              {"controlnet": {"args": [{"image": 5, "module": [], "model": {}}]}}, True, "Karras", 10**30]
    rng = random.Random(7)
    for _ in range(3000):
        data = {"prompt": "p", "steps": 2}
        for _ in range(rng.randint(1, 6)):
            data[rng.choice(keys)] = rng.choice(values)
        try:
            parse_request(data, Limits())
        except Exception as exc:  # what the handler would answer
            message = answer_for(exc, [])[0]
            field = message.partition(":")[0]
            assert not message.startswith("internal") and field and " " not in field, (message, data)

"""ControlNets per request (worker/controlnets.py), on tiny random-weight ControlNets made from
the tiny models' UNets (tests/controlnets.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas import InferenceRequest, describe_validation_error
from tests.fixtures.controlnets import build_controlnet, write_original
from tests.helpers import BLUE, RED, RangeServer, decode, hub_cache, png_b64
from worker.errors import ModelSourceError, UserInputError

BASE = {"prompt": "a door", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def nets(tiny_dir, sdxl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {"sd": build_controlnet(tiny_dir, root / "sd"), "sdxl": build_controlnet(sdxl_dir, root / "sdxl")}


def draw(run, **fields):
    result, _ = run(**(BASE | fields))
    return result


def test_a_controlnet_steers_by_its_image_and_scale(run, nets):
    plain = draw(run).images[0].base64
    control = {"id": str(nets["sd"]), "image": RED}
    first = draw(run, controlnets=[control])
    assert first.images[0].base64 != plain
    assert "controlnets" in first.timings  # loaded now
    again = draw(run, controlnets=[control])
    assert again.images[0].base64 == first.images[0].base64 and "controlnets" not in again.timings  # warm
    assert draw(run, controlnets=[control | {"image": BLUE}]).images[0].base64 != first.images[0].base64
    assert draw(run, controlnets=[control | {"scale": 0}]).images[0].base64 == plain  # steers nothing: bit for bit
    assert draw(run, controlnets=[control | {"start": 0.5}]).images[0].base64 not in (plain, first.images[0].base64)
    assert draw(run).images[0].base64 == plain  # the next request without one is plain again


def test_controlnets_combine_and_run_img2img_and_inpaint(run, nets):
    one = {"id": str(nets["sd"]), "image": RED}
    single = draw(run, controlnets=[one]).images[0].base64
    both = draw(run, controlnets=[one, {"id": str(nets["sd"]), "image": BLUE, "scale": 0.5}]).images[0].base64
    assert both != single
    for task in ({"image": RED}, {"image": RED, "mask_image": png_b64((255, 255, 255))}):
        assert draw(run, **task, controlnets=[one]).images[0].base64 != draw(run, **task).images[0].base64


def test_txt2img_takes_its_size_from_the_control_image(run, nets):
    wide = png_b64(size=(100, 64))
    image = draw(run, controlnets=[{"id": str(nets["sd"]), "image": wide}]).images[0]
    assert (image.width, image.height) == (96, 64) == decode(image.base64).size
    image = draw(run, width=64, height=72, controlnets=[{"id": str(nets["sd"]), "image": wide}]).images[0]
    assert (image.width, image.height) == (64, 72)


def test_sdxl_controlnet_and_one_that_does_not_fit(run, nets, sdxl_dir):
    xl = {"model": {"id": str(sdxl_dir)}}
    steered = draw(run, **xl, controlnets=[{"id": str(nets["sdxl"]), "image": RED}]).images[0].base64
    assert steered != draw(run, **xl).images[0].base64
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* does not fit this model .*cross_attention_dim"):
        draw(run, **xl, controlnets=[{"id": str(nets["sd"]), "image": RED}])
    assert draw(run, **xl).images[0].base64 != steered  # the worker carries on, plain


def on_new_worker(settings, **fields):
    from worker.engine import Engine

    request = InferenceRequest.model_validate(BASE | fields)
    return Engine(settings).generate(request, lambda _: None, lambda: False)


def test_hub_controlnets_are_safetensors_directories(settings, nets, tmp_path):
    hub = hub_cache(tmp_path / "hub", "acme/control-edges", nets["sd"], {"main": "5" * 40})
    worker = settings.model_copy(update={"hf_hub_cache": hub})
    from_hub = on_new_worker(worker, controlnets=[{"id": "acme/control-edges", "image": RED}])
    local = on_new_worker(settings, controlnets=[{"id": str(nets["sd"]), "image": RED}])
    assert from_hub.images[0].base64 == local.images[0].base64

    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.id: acme/other is not cached on this worker"):
        on_new_worker(worker, controlnets=[{"id": "acme/other", "image": RED}])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((nets["sd"] / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.id: .* has no diffusion_pytorch_model"
                                               r"\.safetensors \(ControlNets are loaded from safetensors only\)"):
        on_new_worker(settings, controlnets=[{"id": str(pickled), "image": RED}])


def test_single_file_controlnets_in_either_layout(run, tiny_dir, sdxl_dir, tmp_path):
    """As lllyasviel's ControlNet 1.1 files: the model's UNet encoder, the standard hint encoder."""
    from safetensors.torch import load_file, save_file

    net = build_controlnet(tiny_dir, tmp_path / "standard", hint_channels=(16, 32, 96, 256))
    expected = draw(run, controlnets=[{"id": str(net), "image": RED}]).images[0].base64
    original = write_original(net, tmp_path / "o.safetensors").read_bytes()
    server = RangeServer({"/control_sd15_edges.safetensors": original})
    try:
        fetched = draw(run, controlnets=[{"url": server.url + "/control_sd15_edges.safetensors", "image": RED}])
    finally:
        server.close()
    assert fetched.images[0].base64 == expected
    flat = tmp_path / "diffusers-layout.safetensors"
    save_file(load_file(net / "diffusion_pytorch_model.safetensors"), flat)
    assert draw(run, controlnets=[{"id": str(flat), "image": RED}]).images[0].base64 == expected
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.id: could not load the ControlNet .*do not fit "
                                               r"a copy of this model's UNet encoder"):
        draw(run, model={"id": str(sdxl_dir)}, controlnets=[{"id": str(flat), "image": RED}])


@pytest.mark.parametrize("control, expected", [
    ({"id": "acme/c", "image": RED, "start": 0.6, "end": 0.4},
     "controlnets[0].start: must be below end (0.4), got 0.6"),
    ({"id": "../c", "image": RED}, "controlnets[0].id: must be a hub repo id like 'org/name' or an absolute path"),
    ({"id": "acme/c"}, "controlnets[0].image: "),
    ({"url": "ftp://x/c.safetensors", "image": RED}, "controlnets[0].url: must be an https://, http:// or s3:// URL"),
    ({"image": RED}, "controlnets[0]: give exactly one of url or id"),
    ({"id": "acme/c", "image": "not an image!"}, "controlnets[0].image: must be base64"),
    ({"id": "acme/c", "image": RED, "scale": 6}, "controlnets[0].scale: "),
])
def test_bad_controlnet_fields_name_themselves(control, expected):
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(BASE | {"controlnets": [control]})
    assert describe_validation_error(info.value).startswith(expected)


def test_max_loaded_controlnets_zero_keeps_none_after_the_request(settings, nets):
    from worker.engine import Engine

    engine = Engine(settings.model_copy(update={"max_loaded_controlnets": 0}))

    def job(**fields):
        return engine.generate(InferenceRequest.model_validate(BASE | fields), lambda _: None, lambda: False)

    job(controlnets=[{"id": str(nets["sd"]), "image": RED}])
    job()  # frees it
    assert "controlnets" in job(controlnets=[{"id": str(nets["sd"]), "image": RED}]).timings  # loaded again


def picture(size=(96, 64)) -> str:
    """A plain picture with edges in it: a red half, a blue half, a white square, and a faint
    square (20 levels off the red) that only low thresholds take for an edge."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (220, 30, 30))
    draw_ = ImageDraw.Draw(image)
    draw_.rectangle((size[0] // 2, 0, size[0], size[1]), fill=(30, 30, 220))
    draw_.rectangle((10, 10, 30, 30), fill=(255, 255, 255))
    draw_.rectangle((size[0] // 4, size[1] // 2, size[0] // 4 + 20, size[1] // 2 + 20), fill=(200, 30, 30))
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_canny_preprocessing_is_opencvs_at_the_output_size(run, nets):
    """A plain picture with preprocess canny steers as its Canny edges, computed at the size the
    ControlNet sees, would when sent already preprocessed: the same image, bit for bit."""
    import base64
    import io

    import cv2
    import numpy as np
    from PIL import Image

    photo = picture((192, 128))  # twice the output size: resized first, then edged
    net = {"id": str(nets["sd"]), "image": photo, "preprocess": "canny"}
    edged = draw(run, width=96, height=64, controlnets=[net])
    small = Image.open(io.BytesIO(base64.b64decode(photo))).convert("RGB").resize((96, 64))
    edges = cv2.Canny(np.asarray(small), 100, 200)
    assert set(np.unique(edges)) == {0, 255} and 0.01 < (edges > 0).mean() < 0.3  # edges, not a blank
    buffer = io.BytesIO()
    Image.fromarray(edges).convert("RGB").save(buffer, format="PNG")
    sent = draw(run, width=96, height=64,
                controlnets=[{"id": str(nets["sd"]), "image": base64.b64encode(buffer.getvalue()).decode()}])
    assert edged.images[0].base64 == sent.images[0].base64
    raw = draw(run, width=96, height=64, controlnets=[{"id": str(nets["sd"]), "image": photo}])
    assert raw.images[0].base64 != edged.images[0].base64
    loose = draw(run, width=96, height=64, controlnets=[net | {"low_threshold": 20, "high_threshold": 60}])
    assert loose.images[0].base64 != edged.images[0].base64  # the faint square's edges too


def test_canny_settings_are_checked_and_recorded(run, nets, engine):
    from schemas import parse_request
    from worker.errors import answer_for

    for fields, message in [
        ({"preprocess": "canny", "low_threshold": 200, "high_threshold": 100},
         "controlnets[0].low_threshold: must not be above high_threshold (100), got 200"),
        ({"low_threshold": 50}, "controlnets[0].low_threshold: only with preprocess canny"),
        ({"preprocess": "openpose_full"}, "controlnets[0].preprocess:"),
    ]:
        with pytest.raises(Exception) as info:
            parse_request(BASE | {"controlnets": [{"id": str(nets["sd"]), "image": RED} | fields]},
                          engine.settings.limits)
        answer, _ = answer_for(info.value, [])  # as the handler answers
        assert answer.startswith(message), answer
    result = draw(run, output={"metadata": True}, controlnets=[{"id": str(nets["sd"]), "image": picture(),
                                                                "preprocess": "canny"}])
    text = decode(result.images[0].base64).text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: ' in text


def test_depth_preprocessing_is_the_depth_models_map_at_the_output_size(settings, nets, tmp_path):
    """A plain picture with preprocess depth steers as the depth estimator's map of it, made at
    the size the ControlNet sees, would when sent already made: the same image, bit for bit."""
    import base64
    import io

    from PIL import Image
    from transformers import pipeline

    from tests.fixtures.depth import build_depth_model
    from worker.engine import Engine

    depth_dir = build_depth_model(tmp_path / "depth")
    engine = Engine(settings.model_copy(update={"depth_model": str(depth_dir)}))

    def job(**fields):
        return engine.generate(InferenceRequest.model_validate(BASE | {"width": 96, "height": 64} | fields),
                               lambda _: None, lambda: False).images[0].base64

    photo = picture((192, 128))
    made = job(controlnets=[{"id": str(nets["sd"]), "image": photo, "preprocess": "depth"}])
    small = Image.open(io.BytesIO(base64.b64decode(photo))).convert("RGB").resize((96, 64))
    depth = pipeline("depth-estimation", model=str(depth_dir))(small)["depth"]
    assert depth.size == (96, 64) and len(set(depth.tobytes())) > 10  # a map, not a flat image
    buffer = io.BytesIO()
    depth.convert("RGB").save(buffer, format="PNG")
    assert made == job(controlnets=[{"id": str(nets["sd"]), "image": base64.b64encode(buffer.getvalue()).decode()}])
    assert made != job(controlnets=[{"id": str(nets["sd"]), "image": photo}])


def test_the_depth_model_comes_from_the_hub_cache_or_says_why_not(settings, nets, tmp_path):
    from tests.fixtures.depth import build_depth_model
    from worker.engine import Engine

    control = {"id": str(nets["sd"]), "image": picture(), "preprocess": "depth"}
    request = InferenceRequest.model_validate(BASE | {"controlnets": [control]})
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.preprocess: depth-anything/Depth-Anything-V2-"
                                               r"Small-hf is not cached on this worker and HF_HUB_OFFLINE is set"):
        Engine(settings).generate(request, lambda _: None, lambda: False)
    hub = hub_cache(tmp_path / "hub", "depth-anything/Depth-Anything-V2-Small-hf",
                    build_depth_model(tmp_path / "depth"), {"main": "d" * 40})
    engine = Engine(settings.model_copy(update={"hf_hub_cache": hub}))
    assert engine.generate(request, lambda _: None, lambda: False).images


# A person facing the camera, in COCO's 17 keypoints (their right on the left of the picture).
STANDING = {0: (256, 80), 1: (266, 70), 2: (246, 70), 3: (276, 76), 4: (236, 76), 5: (296, 140), 6: (216, 140),
            7: (312, 220), 8: (200, 220), 9: (322, 300), 10: (190, 300), 11: (282, 300), 12: (230, 300),
            13: (286, 400), 14: (226, 400), 15: (290, 490), 16: (222, 490)}


def test_openpose_skeletons_are_drawn_as_controlnets_annotator_draws_them():
    """OpenPose's 18 points in their colours (the neck between the shoulders), limbs dimmed to
    60 %, on black; what the estimator is not sure of is left out, with the limbs it ends."""
    import numpy as np

    from worker.parts.preprocess import COLORS, draw_pose

    canvas = np.asarray(draw_pose((512, 512), [STANDING]))
    assert canvas.shape == (512, 512, 3) and (canvas[5, 5] == 0).all()
    nose, neck, right_shoulder, left_ankle = (256, 80), (256, 140), (216, 140), (290, 490)
    for (x, y), color in [(nose, COLORS[0]), (neck, COLORS[1]), (right_shoulder, COLORS[2]), (left_ankle, COLORS[13])]:
        assert tuple(canvas[y, x]) == color
    # The limb from the neck to the nose (OpenPose's 13th, blue), halfway up, at 60 %.
    assert tuple(canvas[110, 256]) == (0, 0, 153)
    assert tuple(canvas[110, 256 + 3]) == (0, 0, 153) and (canvas[110, 256 + 6] == 0).all()  # 4 px at 512 px

    unsure = {i: point for i, point in STANDING.items() if i != 6}  # no right shoulder: no neck either
    canvas = np.asarray(draw_pose((512, 512), [unsure]))
    assert (canvas[140, 216] == 0).all() and (canvas[110, 256] == 0).all()
    assert tuple(canvas[80, 256]) == COLORS[0]

    # Twice the size: twice as wide, in the same places; and several people at once.
    wide = np.asarray(draw_pose((1024, 1024), [{i: (x * 2, y * 2) for i, (x, y) in STANDING.items()},
                                               {0: (900, 100)}]))
    assert tuple(wide[220, 512 + 7]) == (0, 0, 153) and (wide[220, 512 + 10] == 0).all()
    assert tuple(wide[100, 900]) == COLORS[0]
    assert not np.asarray(draw_pose((64, 64), [])).any()


def test_openpose_preprocessing_draws_the_people_the_models_find(settings, nets, tmp_path):
    """A plain picture with preprocess openpose steers as the skeletons of the people found in it
    (transformers' documented RT-DETR → ViTPose pair, at the output size) would when sent
    already drawn; a picture where nobody is found steers as a black one."""
    import base64
    import io

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, RTDetrForObjectDetection, VitPoseForPoseEstimation

    from tests.fixtures.pose import build_pose_models
    from worker.engine import Engine
    from worker.parts.preprocess import draw_pose

    detector_dir, estimator_dir = build_pose_models(tmp_path / "pose")
    engine = Engine(settings.model_copy(update={"person_model": str(detector_dir),
                                                "pose_model": str(estimator_dir)}))

    def job(engine, image, **fields):
        net = {"id": str(nets["sd"]), "image": image} | fields
        request = InferenceRequest.model_validate(BASE | {"width": 96, "height": 64, "controlnets": [net]})
        return engine.generate(request, lambda _: None, lambda: False).images[0].base64

    def sent(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    photo = picture((192, 128))
    small = Image.open(io.BytesIO(base64.b64decode(photo))).convert("RGB").resize((96, 64))
    detector = RTDetrForObjectDetection.from_pretrained(detector_dir)
    detector_processor = AutoImageProcessor.from_pretrained(detector_dir)
    estimator = VitPoseForPoseEstimation.from_pretrained(estimator_dir)
    estimator_processor = AutoImageProcessor.from_pretrained(estimator_dir)
    with torch.inference_mode():
        found = detector_processor.post_process_object_detection(
            detector(**detector_processor(images=small, return_tensors="pt")), target_sizes=[(64, 96)],
            threshold=0.3)[0]
        boxes = found["boxes"][found["labels"] == 0].numpy()
        boxes[:, 2:] -= boxes[:, :2]
        poses = estimator_processor.post_process_pose_estimation(
            estimator(**estimator_processor(small, boxes=[boxes], return_tensors="pt")), boxes=[boxes],
            threshold=0.3)[0]
    people = [{int(i): (float(x), float(y)) for i, (x, y) in zip(pose["labels"], pose["keypoints"])}
              for pose in poses]
    assert len(people) == 4 and all(len(person) == 17 for person in people)
    skeletons = draw_pose((96, 64), people)
    assert skeletons.getbbox() is not None  # something drawn
    made = job(engine, photo, preprocess="openpose")
    assert made == job(engine, sent(skeletons))
    assert made != job(engine, photo)

    nobody_dir, _ = build_pose_models(tmp_path / "nobody", people=False)
    empty = Engine(settings.model_copy(update={"person_model": str(nobody_dir), "pose_model": str(estimator_dir)}))
    assert job(empty, photo, preprocess="openpose") == job(empty, sent(Image.new("RGB", (96, 64))))


def test_the_pose_models_come_from_the_hub_cache_or_say_why_not(settings, nets, tmp_path):
    from tests.fixtures.pose import build_pose_models
    from worker.engine import Engine

    detector_dir, estimator_dir = build_pose_models(tmp_path / "pose")
    control = {"id": str(nets["sd"]), "image": picture(), "preprocess": "openpose"}
    request = InferenceRequest.model_validate(BASE | {"controlnets": [control], "output": {"metadata": True}})
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.preprocess: PekingU/rtdetr_r50vd_coco_o365 is "
                                               r"not cached on this worker and HF_HUB_OFFLINE is set"):
        Engine(settings).generate(request, lambda _: None, lambda: False)
    hub = hub_cache(tmp_path / "hub", "PekingU/rtdetr_r50vd_coco_o365", detector_dir, {"main": "e" * 40})
    with pytest.raises(ModelSourceError, match=r"^controlnets\[0\]\.preprocess: usyd-community/vitpose-base-simple "
                                               r"is not cached"):
        Engine(settings.model_copy(update={"hf_hub_cache": hub})).generate(request, lambda _: None, lambda: False)
    hub_cache(hub, "usyd-community/vitpose-base-simple", estimator_dir, {"main": "f" * 40})
    engine = Engine(settings.model_copy(update={"hf_hub_cache": hub}))
    result = engine.generate(request, lambda _: None, lambda: False)
    assert 'ControlNet 0: "Module: openpose, Model: ' in decode(result.images[0].base64).text["parameters"]

    # A detector without a person class, or not a detector at all, is refused by name.
    import json
    import shutil

    cars = tmp_path / "cars"
    shutil.copytree(detector_dir, cars)
    config = json.loads((cars / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "car", "1": "bicycle"}, {"car": 0, "bicycle": 1}
    (cars / "config.json").write_text(json.dumps(config))
    for person_model, why in [(cars, "it has no class labelled person"), (estimator_dir, "ValueError: ")]:
        wrong = Engine(settings.model_copy(update={"person_model": str(person_model),
                                                   "pose_model": str(estimator_dir)}))
        with pytest.raises(ModelSourceError) as info:
            wrong.generate(request, lambda _: None, lambda: False)
        assert str(info.value).startswith(f"controlnets[0].preprocess: the person detector PERSON_MODEL="
                                          f"{person_model} could not be loaded ("), str(info.value)
        assert why in str(info.value)

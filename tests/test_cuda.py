"""Every per-request part on CUDA in fp16 at once (``pytest -m gpu`` on a GPU machine; skipped
elsewhere): device and dtype must follow the model's for ControlNets (and the depth and
pose preprocessors), IP-Adapters, request VAEs, prompt windows, the hires pass, seamless
tiling's circular padding and variation seeds' noise, which CPU runs cannot show."""

from __future__ import annotations

import pytest

from schemas import InferenceRequest
from tests.fixtures.controlnets import build_controlnet, build_sd3_controlnet
from tests.fixtures.ip_adapters import WEIGHTS, build_ip_adapter
from tests.helpers import decode, png_b64


@pytest.mark.gpu
def test_everything_per_request_on_cuda_in_fp16(settings, tiny_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from tests.fixtures.depth import build_depth_model
    from tests.fixtures.pose import build_pose_models
    from worker.engine import Engine

    detector_dir, estimator_dir = build_pose_models(tmp_path / "pose")
    engine = Engine(settings.model_copy(update={"device": "cuda",
                                                "depth_model": str(build_depth_model(tmp_path / "depth")),
                                                "person_model": str(detector_dir),
                                                "pose_model": str(estimator_dir)}))
    net_dir = str(build_controlnet(tiny_dir, tmp_path / "net"))
    request = InferenceRequest.model_validate({
        "prompt": "(lighthouse:1.3) " * 12 + "BREAK red", "num_inference_steps": 4, "seed": 2,
        "controlnets": [{"id": net_dir, "image": png_b64()},
                        {"id": net_dir, "image": png_b64(), "preprocess": "depth"}],
        "ip_adapter": {"id": str(build_ip_adapter(tiny_dir, tmp_path / "ip")), "weight_name": WEIGHTS,
                       "image": png_b64((0, 0, 255))},
        "vae": {"id": str(tiny_dir / "vae")}, "hires": {"scale": 1.5, "upscaler": "lanczos"}, "tiling": True,
        "variation": {"seed": 7, "strength": 0.3},
    })
    result = engine.generate(request, lambda _: None, lambda: False)
    assert (result.model.device, result.model.precision) == ("cuda", "fp16")
    assert decode(result.images[0].base64).size == (96, 96)
    [net] = engine.controlnets.warm.values()
    [encoder] = engine.ip_adapters.encoders.values()
    [vae] = engine.vaes.warm.values()
    for module in (net, encoder, vae):
        assert (module.device.type, module.dtype) == ("cuda", torch.float16)
    [depth] = engine.inputs.depth.warm.values()
    assert depth.model.device.type == "cuda"  # (in fp32: 25 M parameters)
    # The pose models find people on CUDA (drawing them is OpenCV's, on the CPU: not here, where
    # OpenCV's wheel would not fit beside the others).
    from PIL import Image

    assert len(engine.pose.find(Image.new("RGB", (96, 64)), "controlnets[0].preprocess")) == 4
    [(detector, _, estimator, _)] = engine.inputs.pose.warm.values()
    assert detector.device.type == estimator.device.type == "cuda"  # (fp32 too: 43 M and 90 M)
    plain = engine.generate(InferenceRequest.model_validate({"prompt": "a", "num_inference_steps": 2}),
                            lambda _: None, lambda: False)
    assert plain.images[0].width == 64  # and the warm model is plain again


@pytest.mark.gpu
def test_an_sdxl_refiner_takes_turns_with_its_model_on_cuda(settings, sdxl_dir, tmp_path):
    """With one model on the GPU, the refiner's load parks the model in CPU RAM, and the next
    request gets it back from there (``memory``), not from disk."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from tests.fixtures.sdxl import build_sdxl_refiner
    from worker.engine import Engine

    engine = Engine(settings.model_copy(update={"device": "cuda", "max_loaded_models": 1, "max_parked_models": 1}))

    def job(**fields):
        request = InferenceRequest.model_validate({"prompt": "a", "num_inference_steps": 4, "seed": 1,
                                                   "model": {"id": str(sdxl_dir)}} | fields)
        return engine.generate(request, lambda _: None, lambda: False)

    plain = job()
    refined = job(refiner={"id": str(build_sdxl_refiner(tmp_path / "refiner")), "switch": 0.5})
    assert refined.refiner.device == "cuda" and refined.images[0].base64 != plain.images[0].base64
    again = job()
    assert again.model.source == "memory" and again.images[0].base64 == plain.images[0].base64


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sd3_on_cuda(settings, sd3_dir, tmp_path, precision):
    """SD3 (MMDiT, two CLIPs and T5) in both half precisions: an img2img at a size of its own,
    a txt2img steered by an SD3 ControlNet."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from worker.engine import Engine

    engine = Engine(settings.model_copy(update={"device": "cuda"}))
    request = InferenceRequest.model_validate({
        "prompt": "a lighthouse " * 40, "num_inference_steps": 4, "seed": 2, "image": png_b64(size=(96, 64)),
        "model": {"id": str(sd3_dir), "precision": precision},
    })
    result = engine.generate(request, lambda _: None, lambda: False)
    assert (result.model.device, result.model.precision) == ("cuda", precision)
    assert decode(result.images[0].base64).size == (96, 64)
    [loaded] = engine.models.loaded()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for name in ("transformer", "text_encoder_3", "vae"):
        module = loaded.pipeline.components[name]
        assert (module.device.type, module.dtype) == ("cuda", dtype), name
    steered = engine.generate(InferenceRequest.model_validate({
        "prompt": "a lighthouse", "num_inference_steps": 4, "model": {"id": str(sd3_dir), "precision": precision},
        "controlnets": [{"id": str(build_sd3_controlnet(sd3_dir, tmp_path / "net")), "image": png_b64()}],
    }), lambda _: None, lambda: False)
    assert decode(steered.images[0].base64).size == (64, 64)
    [net] = engine.controlnets.warm.values()
    assert (net.device.type, net.dtype) == ("cuda", dtype)

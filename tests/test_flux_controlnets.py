"""FLUX.1 ControlNets (FluxControlNetModel: InstantX's, the Union ones with a mode) on the tiny
model, each against diffusers' FluxControlNet pipelines; what they take and refuse, by field."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_images_close, decode, image_b64, png_b64, stripes
from worker.errors import UserInputError

SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def flux_nets(flux_dir, tmp_path_factory):
    from tests.fixtures.flux import build_flux_controlnet

    root = tmp_path_factory.mktemp("flux-controlnets")
    return {"plain": str(build_flux_controlnet(flux_dir, root / "net")),
            "union": str(build_flux_controlnet(flux_dir, root / "union", seed=1, modes=3))}


def diffusers_controlnet_image(model_dir, net, seed: int, **fields):
    import diffusers

    pipe = diffusers.FluxControlNetPipeline.from_pretrained(
        model_dir, controlnet=diffusers.FluxControlNetModel.from_pretrained(net))
    pipe.set_progress_bar_config(disable=True)
    return pipe(**fields, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_a_controlnet_steers_as_diffusers_fluxcontrolnetpipeline_at_its_defaults(run, flux_dir, flux_nets):
    """FluxControlNetPipeline's own defaults (28 steps, guidance 7) where the request leaves them
    out; the answer at the control image's size."""
    control = stripes((64, 64))
    net = {"id": flux_nets["plain"], "image": image_b64(control)}
    result, events = run(prompt="a lighthouse", seed=3, controlnets=[net], model={"id": str(flux_dir)})
    assert [e.total for e in events if e.stage == "inference"][-1] == 28
    expected = diffusers_controlnet_image(flux_dir, flux_nets["plain"], 3, prompt="a lighthouse", control_image=control,
                                          width=64, height=64)
    assert_images_close(expected, decode(result.images[0].base64), "flux-controlnet", tolerance=0)
    plain, _ = run(prompt="a lighthouse", seed=3, num_inference_steps=28, guidance_scale=7.0,
                   model={"id": str(flux_dir)}, **SIZE)
    assert plain.images[0].base64 != result.images[0].base64


def test_a_union_controlnet_is_told_its_mode(run, flux_dir, flux_nets):
    control = stripes((64, 64))
    fields = dict(prompt="a lighthouse", seed=4, num_inference_steps=3, model={"id": str(flux_dir)})
    depth, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": image_b64(control), "mode": 2}])
    expected = diffusers_controlnet_image(flux_dir, flux_nets["union"], 4, prompt="a lighthouse", control_image=control,
                                          control_mode=2, num_inference_steps=3, width=64, height=64)
    assert_images_close(expected, decode(depth.images[0].base64), "flux-union", tolerance=0)
    canny, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": image_b64(control), "mode": 0}])
    assert canny.images[0].base64 != depth.images[0].base64
    # Two at once (FluxMultiControlNetModel), a Union one among them.
    both, _ = run(**fields, controlnets=[{"id": flux_nets["union"], "image": image_b64(control), "mode": 2},
                                         {"id": flux_nets["plain"], "image": image_b64(control), "scale": 0.5}])
    assert both.images[0].base64 not in (depth.images[0].base64, canny.images[0].base64)


def test_img2img_and_inpainting_take_controlnets_too(run, flux_dir, flux_nets):
    image = stripes((64, 64))
    fields = dict(prompt="a lighthouse", seed=5, num_inference_steps=4, image=image_b64(image),
                  model={"id": str(flux_dir)})
    net = [{"id": flux_nets["plain"], "image": image_b64(image.rotate(90))}]
    for task in ({}, {"mask_image": png_b64((255, 255, 255))}):
        plain, _ = run(**fields, **task)
        steered, _ = run(**fields, **task, controlnets=net)
        assert steered.images[0].base64 != plain.images[0].base64


@pytest.mark.parametrize("net, mode, message", [
    ("union", None, "controlnets[0].mode: {net} is a Union ControlNet: say which kind of control image this is "
                    "(0 to 2, as its model card numbers them)"),
    ("union", 3, "controlnets[0].mode: {net} has modes 0 to 2, got 3"),
    ("plain", 1, "controlnets[0].mode: {net} is not a Union ControlNet: it takes no mode"),
])
def test_a_union_controlnets_mode_is_checked_by_field(run, flux_dir, flux_nets, net, mode, message):
    spec = {"id": flux_nets[net], "image": png_b64()} | ({} if mode is None else {"mode": mode})
    with pytest.raises(UserInputError) as info:
        run(prompt="p", num_inference_steps=1, controlnets=[spec], model={"id": str(flux_dir)})
    assert str(info.value) == message.format(net=flux_nets[net])


def test_controlnets_of_other_families_are_refused_on_flux(run, flux_dir, flux_nets, tiny_dir, tmp_path):
    from tests.fixtures.controlnets import build_controlnet

    sd_net = str(build_controlnet(tiny_dir, tmp_path / "sd-net"))
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* is a ControlNet for SD 1\.x, 2\.x or XL models"):
        run(prompt="p", num_inference_steps=1, controlnets=[{"id": sd_net, "image": png_b64()}],
            model={"id": str(flux_dir)})
    with pytest.raises(UserInputError, match=r"^controlnets\[0\]: .* is a ControlNet for FLUX\.1 models"):
        run(prompt="p", num_inference_steps=1, controlnets=[{"id": flux_nets["plain"], "image": png_b64()}])


def test_what_fluxs_controlnet_img2img_pipeline_lacks_is_refused_by_field(run, flux_dir, flux_nets):
    image = image_b64(stripes((64, 64)))
    net = {"id": flux_nets["plain"], "image": image}
    for field, value in (("negative_prompt", "fog"), ("true_cfg_scale", 2.0)):
        with pytest.raises(UserInputError, match=rf"^{field}: diffusers' FluxControlNetImg2ImgPipeline, which runs "
                                                 "this request, takes none"):
            run(prompt="p", num_inference_steps=2, image=image, controlnets=[net], model={"id": str(flux_dir)},
                **{field: value})

"""A job's input images as its pipeline takes them: the image (and mask) to work from, the
ControlNets' control images (preprocessed where asked), all sized to what will be generated."""

from __future__ import annotations

from typing import Any

from PIL import ImageOps

from schemas import InferenceRequest

from .errors import UserInputError
from .images import fit, load_image
from .inpainting import grow, prepare
from .parts.preprocess import Depth, Pose, canny
from .plan import Plan
from .settings import Settings


class Inputs:
    """Reads and sizes input images; owns the preprocessors' models (depth, pose), kept warm."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.depth = Depth(settings, device)
        self.pose = Pose(settings, device)

    def prepare(self, plan: Plan) -> None:
        """``plan.images``: the pipeline's image, mask, size and ControlNet arguments ({} for a
        txt2img without size or ControlNets); ``plan.inpainting``: how an inpainting answer is
        pasted together. With the hires fix, the first pass's size is always set."""
        request, family, base = plan.request, plan.family, plan.base
        plan.images = self._images(plan)
        plan.images.update(self._controls(plan))
        if request.hires:  # the first pass's size is needed to know the second's
            plan.images.setdefault("width", family.default_size(base))
            plan.images.setdefault("height", family.default_size(base))
            width, height = plan.images["width"], plan.images["height"]
            if request.hires.size(width, height, family.multiple(base)) > self.settings.max_pixels:
                raise UserInputError("hires.scale", f"{width}x{height} times {request.hires.scale} is over this "
                                                    f"endpoint's {self.settings.max_pixels} pixels")

    def clear(self) -> None:
        """Free the device (for training)."""
        self.depth.clear()
        self.pose.clear()

    def _images(self, plan: Plan) -> dict:
        request, family, base = plan.request, plan.family, plan.base
        if request.task == "txt2img":
            if not (request.width or request.height):
                return {}  # the pipeline's own size
            width, height = request.width or family.default_size(base), request.height or family.default_size(base)
            return {"width": width, "height": height} | family.txt2img_size(width, height)
        if request.task == "edit":
            references = request.references()
            images = [load_image(source, field, self.settings) for field, source in references]
            for (field, _), image in zip(references, images):
                family.check_reference(image, field)
            width, height = self.size_from(images[0], request, references[0][0], family.multiple(base))
            return family.edit_inputs(images, width, height, request.resize_mode)
        image = load_image(request.image, "image", self.settings)
        if request.task == "img2img":
            width, height = self.size_from(image, request, "image", family.multiple(base))
            args = {"image": fit(image, (width, height), request.resize_mode)}
            return args | {"strength": request.strength} | family.img2img_size(width, height)
        if request.outpaint:
            (image, mask), field = grow(image, request.outpaint), "outpaint"
        else:
            mask, field = load_image(request.mask_image, "mask_image", self.settings, mode="L"), "image"
            if request.mask_invert:
                mask = ImageOps.invert(mask)
        if request.padding_mask_crop is None:
            width, height = self.size_from(image, request, field, family.multiple(base))
        else:  # the image keeps its size: this is the size its masked area is repainted at
            width, height = request.width or family.default_size(base), request.height or family.default_size(base)
        plan.inpainting = inpainting = prepare(image, mask, (width, height), request.mask_blur,
                                               request.padding_mask_crop, request.resize_mode)
        return {"image": inpainting.cut(inpainting.original), "mask_image": inpainting.cut(inpainting.mask),
                "strength": request.strength, "width": width, "height": height}

    def _controls(self, plan: Plan) -> dict:
        """The ControlNets' images at the output size (cut as the input is, for inpainting), and
        how each steers. txt2img takes its size from the first control image when the request
        gives none."""
        request, family = plan.request, plan.family
        if not request.controlnets:
            return {}
        controls = [load_image(spec.image, f"controlnets[{i}].image", self.settings)
                    for i, spec in enumerate(request.controlnets)]
        if request.task == "txt2img":
            width, height = self.size_from(controls[0], request, "controlnets[0].image", family.multiple(plan.base))
            size = {"width": width, "height": height}
        else:
            width, height = plan.images["image"].size
            size = {}
        if plan.inpainting:
            controls = [plan.inpainting.cut(c) for c in controls]
        controls = [fit(c, (width, height), request.resize_mode) for c in controls]
        # Preprocessed at the output size, where the ControlNet sees them.
        for i, spec in enumerate(request.controlnets):
            if spec.preprocess == "canny":
                controls[i] = canny(controls[i], spec.low_threshold, spec.high_threshold)
            elif spec.preprocess == "depth":
                controls[i] = self.depth(controls[i], f"controlnets[{i}].preprocess")
            elif spec.preprocess == "openpose":
                controls[i] = self.pose(controls[i], f"controlnets[{i}].preprocess")

        def each(values: list) -> Any:
            return values[0] if len(values) == 1 else values

        modes = [spec.mode for spec in request.controlnets]
        return size | {
            family.control_images_as(request.task): each(controls),
            "controlnet_conditioning_scale": each([spec.scale for spec in request.controlnets]),
            "control_guidance_start": each([spec.start for spec in request.controlnets]),
            "control_guidance_end": each([spec.end for spec in request.controlnets]),
        } | ({"control_mode": each(modes)} if any(mode is not None for mode in modes) else {})

    def size_from(self, image, request: InferenceRequest, field: str, multiple: int) -> tuple[int, int]:
        """Output size: as asked, else the input's, rounded down to the model's ``multiple``."""
        width = request.width or image.width // multiple * multiple
        height = request.height or image.height // multiple * multiple
        if width < 64 or height < 64:
            raise UserInputError(field, f"{image.width}x{image.height} is smaller than 64x64")
        if width * height > self.settings.max_pixels:
            raise UserInputError(
                field, f"{image.width}x{image.height} is over this endpoint's {self.settings.max_pixels} "
                "pixels; send width and height to resize it"
            )
        return width, height


def vae_pixels(plan: Plan) -> int:
    """Pixels of the largest image the VAE handles in this job."""
    request, images = plan.request, plan.images
    if "width" in images:
        width, height = images["width"], images["height"]
    elif request.task != "txt2img":
        width, height = images["image"].size
    else:
        width = height = plan.family.default_size(plan.base)
    if request.hires:
        width, height = request.hires.final(width, height, plan.family.multiple(plan.base))
    return width * height

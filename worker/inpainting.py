"""Inpainting as AUTOMATIC1111 does it, with diffusers' own image helpers; and outpainting.

- ``mask_blur``: the mask's edge is blurred, so the repainted part fades into the kept image
  (the pipeline itself still repaints where the blurred mask is over one half).
- ``keep_unmasked``: the input's own pixels come back outside the mask, blended through the
  blurred edge. A pipeline's image has been through the VAE everywhere, which softens faces,
  text and fine detail that were never meant to change.
- ``padding_mask_crop``: only the masked area is repainted. The mask's box plus the padding,
  widened to the aspect of the working size, is cut out, repainted at that size (more pixels
  for a small area than the whole image would give it), and pasted back into the input, which
  keeps its size.
- ``outpaint``: inpainting on the image's canvas grown by margins, which are the mask. They
  start from the image's edge pixels stretched out (or its mirror image), which is what a
  4-channel model denoises from below strength 1; the blurred mask edge blends the seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

from schemas import OutpaintSpec

from .errors import UserInputError
from .images import fit, image_processor


@dataclass
class Inpainting:
    original: Image.Image  # the input image, at the size the answer has
    mask: Image.Image  # its mask at that size, blurred
    size: tuple[int, int]  # what the pipeline works at
    region: tuple[int, int, int, int] | None  # padding_mask_crop: the area repainted (x0, y0, x1, y1)
    resize_mode: str  # how a control image of another shape takes the input's size

    def cut(self, image: Image.Image) -> Image.Image:
        """``image`` (the input, its mask, a control image) as the pipeline takes it."""
        image = fit(image, self.original.size, self.resize_mode)
        return image if self.region is None else fit(image.crop(self.region), self.size, "fill")

    def paste(self, generated: Image.Image) -> Image.Image:
        """The answer: ``generated`` where the mask is, the input elsewhere."""
        return image_processor().apply_overlay(self.mask, self.original, generated, self.region)


def prepare(image: Image.Image, mask: Image.Image, size: tuple[int, int], blur: int,
            padding: int | None, resize_mode: str) -> Inpainting:
    """How to inpaint ``image`` under ``mask``: at ``size``, which for the whole image (no
    ``padding``) is the size it takes (by ``resize_mode``, as the mask does), and for only the
    masked area the size that area is repainted at."""
    mask = fit(mask, image.size, resize_mode)
    if padding is None:
        image, mask = fit(image, size, resize_mode), fit(mask, size, resize_mode)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    region = None
    if padding is not None:
        if mask.getbbox() is None:
            raise UserInputError("mask_image", "is black all over: no area to repaint for padding_mask_crop")
        region = VaeImageProcessor.get_crop_region(mask, size[0], size[1], pad=padding)
    return Inpainting(image, mask, size, region, resize_mode)


def grow(image: Image.Image, spec: OutpaintSpec) -> tuple[Image.Image, Image.Image]:
    """``image`` on a canvas grown by ``spec``'s margins, and the mask of the margins."""
    pixels = np.pad(np.asarray(image.convert("RGB")), ((spec.top, spec.bottom), (spec.left, spec.right), (0, 0)),
                    mode="edge" if spec.fill == "edge" else "symmetric")
    canvas = Image.fromarray(pixels)
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (spec.left, spec.top, spec.left + image.width, spec.top + image.height))
    return canvas, mask

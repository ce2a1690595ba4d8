"""Input images in (base64, data: URI, URL) and output images out (png / jpeg / webp bytes)."""

from __future__ import annotations

import base64
import binascii
import functools
import io

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import UserInputError
from .settings import Settings
from .urls import fetch_bytes

# Decoding an input image costs memory by its pixel count, whatever its file size.
_INPUT_PIXELS_PER_OUTPUT_PIXEL = 4
_IMAGE_DESCRIPTION = 0x010E  # EXIF tags
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def _raw_bytes(source: str, field: str, settings: Settings) -> bytes:
    if source.startswith(("http://", "https://")):
        return fetch_bytes(
            source,
            field,
            max_bytes=settings.max_input_image_bytes,
            timeout=settings.url_timeout_s,
            allow_private=settings.allow_private_urls,
        )
    if source.startswith("data:"):
        header, _, source = source.partition(",")
        if not header.endswith(";base64"):
            raise UserInputError(field, "data: URI must be base64-encoded (data:image/png;base64,...)")
    text = "".join(source.split())
    text += "=" * (-len(text) % 4)  # clients often drop the padding
    try:
        return base64.b64decode(text, altchars=b"-_" if "-" in text or "_" in text else None, validate=True)
    except (binascii.Error, ValueError):
        raise UserInputError(field, "is not valid base64") from None


def load_image(source: str, field: str, settings: Settings, mode: str = "RGB") -> Image.Image:
    """Decode a request image; every failure names ``field``."""
    data = _raw_bytes(source, field, settings)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > settings.max_pixels * _INPUT_PIXELS_PER_OUTPUT_PIXEL:
            raise UserInputError(field, f"{width}x{height} pixels is too large for this endpoint")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise UserInputError(field, "is not a readable image (send PNG, JPEG or WebP)") from None
    return image.convert(mode)


def infotext(data: str | None) -> str:
    """The "parameters" text (AUTOMATIC1111's infotext) of a base64 PNG, or ''."""
    if not data:
        return ""
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.info.get("parameters", "")
    except (UnidentifiedImageError, OSError, ValueError):
        return ""


def fit(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """``image`` at ``size``: ``stretch``ed to it, or scaled to cover it and ``crop``ped to it
    (centred), or scaled to fit in it and ``fill``ed out with its stretched edges (diffusers'
    resize modes, which are AUTOMATIC1111's "Just resize", "Crop and resize", "Resize and fill")."""
    if image.size == size:
        return image
    if mode == "stretch":
        return image.resize(size)
    fitted = image_processor().resize(image, height=size[1], width=size[0], resize_mode=mode)
    return fitted.convert(image.mode)


@functools.cache
def image_processor():
    """diffusers' image helpers (resize modes, overlay), made once."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor()


def encode_image(image: Image.Image, fmt: str, quality: int | None, parameters: str | None = None) -> bytes:
    """``image`` as file bytes; ``parameters`` (how it was made) goes where image tools read it:
    a PNG ``parameters`` text chunk (AUTOMATIC1111's); for JPEG and WebP, the EXIF UserComment
    in UTF-16 as AUTOMATIC1111 writes it (any script survives), and the ImageDescription (ASCII:
    other characters become "?")."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = None
        if parameters:
            info = PngInfo()
            info.add_itxt("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        if parameters:
            exif[_IMAGE_DESCRIPTION] = parameters
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.save(buffer, format=fmt.upper(), quality=quality or 90, exif=exif)
    return buffer.getvalue()

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
from .sources.urls import fetch_bytes

# Decoding an input image costs memory by its pixel count, whatever its file size.
_INPUT_PIXELS_PER_OUTPUT_PIXEL = 4
_IMAGE_DESCRIPTION = 0x010E  # EXIF tags
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
JPEG_EXIF_BYTES = 65533  # one JPEG marker segment (Pillow refuses more)


def _raw_bytes(source: str, field: str, settings: Settings) -> bytes:
    """The file bytes of a request image, at most MAX_INPUT_IMAGE_BYTES however it comes."""
    limit = settings.max_input_image_bytes
    if source.startswith(("http://", "https://")):
        return fetch_bytes(source, field, max_bytes=limit, settings=settings)
    if source.startswith("data:"):
        header, _, source = source.partition(",")
        if not header.endswith(";base64"):
            raise UserInputError(field, "data: URI must be base64-encoded (data:image/png;base64,...)")
    text = "".join(source.split())
    if len(text) // 4 * 3 > limit:  # told before decoding: a base64 image costs memory too
        raise UserInputError(field, f"is {len(text) // 4 * 3} bytes, over the {limit} this endpoint allows "
                                    "(MAX_INPUT_IMAGE_BYTES)")
    text += "=" * (-len(text) % 4)  # clients often drop the padding
    try:
        return base64.b64decode(text, altchars=b"-_" if "-" in text or "_" in text else None, validate=True)
    except (binascii.Error, ValueError):
        raise UserInputError(field, "is not valid base64") from None


def load_image(source: str, field: str, settings: Settings, mode: str = "RGB") -> Image.Image:
    """Decode a request image; every failure names ``field``."""
    data = _raw_bytes(source, field, settings)
    most = settings.max_pixels * _INPUT_PIXELS_PER_OUTPUT_PIXEL
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > most:
            raise UserInputError(field, f"{width}x{height} pixels is too large for this endpoint (at most {most})")
        image.load()
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours: a bomb, told as such
        raise UserInputError(field, f"is too large for this endpoint (more than {most} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
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
        image.save(buffer, format=fmt.upper(), quality=quality or 90, exif=_exif(parameters, fmt))
    return buffer.getvalue()


def _exif(parameters: str | None, fmt: str) -> Image.Exif:
    """``parameters`` as EXIF. A JPEG holds at most 64 KB of it: there the UTF-16 UserComment
    (what AUTOMATIC1111 reads) comes first, its ASCII copy only if it fits too, and a text too
    long for even that is cut (a request whose prompts cannot fit is refused before the work:
    schemas' ``JPEG_METADATA_CHARS``)."""
    exif = Image.Exif()
    if not parameters:
        return exif
    exif[_IMAGE_DESCRIPTION] = parameters
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    if fmt != "jpeg" or len(exif.tobytes()) <= JPEG_EXIF_BYTES:
        return exif
    del exif[_IMAGE_DESCRIPTION]
    excess = len(exif.tobytes()) - JPEG_EXIF_BYTES
    if excess > 0:
        encoded = parameters.encode("utf-16-be")
        kept = encoded[: len(encoded) - excess - excess % 2].decode("utf-16-be", "ignore")  # no half characters
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + kept.encode("utf-16-be")
    return exif

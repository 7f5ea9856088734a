"""Base64 images in and out of the HTTP APIs."""

from __future__ import annotations

import base64
import binascii
import io

from sdtrt.errors import UsageError

MAX_INPUT_PIXELS = 4096 * 4096  # checked from the header, before decoding (decompression bombs)


def decode_image(data: str, what: str):
    """A base64 image (raw or a ``data:image/...;base64,`` URL, as A1111 clients send) -> RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise UsageError(f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())  # MIME-style line breaks
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise UsageError(f"{what}: {image.width}x{image.height} is over the limit of {MAX_INPUT_PIXELS} pixels")
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise UsageError(f"{what}: not a readable image (PNG, JPEG, WebP, ...)") from None
    return image.convert("RGB")


def encode_png(image, parameters: str | None = None) -> str:
    """PIL image -> base64 PNG, with A1111's ``parameters`` text chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")

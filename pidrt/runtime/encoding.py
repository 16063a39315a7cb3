"""Encoding generated pixels into image files (what the Generator hands back)."""

from __future__ import annotations

import io

from pidrt.runtime.requests import FORMATS, InvalidRequest


def encode_image(array, fmt: str, quality: int = 95) -> bytes:
    """[H, W, 3] uint8 -> PNG / JPEG / WebP bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array, "RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality))
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=int(quality))
    else:
        raise InvalidRequest(f"output_format must be one of {list(FORMATS)}; got {fmt!r}")
    return buf.getvalue()

"""Edits from image files: what an uploaded image and mask (HTTP) or a path (CLI) become.

Mask conventions, both accepted:
- a mask with an alpha channel follows OpenAI's images/edits: transparent pixels mark the region
  to repaint (alpha <= 127 after diffusers' binarisation at 0.5; fully transparent always);
- a mask without alpha follows diffusers: white (>= 128 grey) is repainted, black kept.
Without a mask file, an image with transparent pixels is its own mask (as OpenAI's API does);
an opaque image without a mask is img2img of the whole image.

The mask must have the image's size. Both are resized to the generation's size when that
differs (the image with Lanczos, the mask's repaint weight bilinearly, then binarised).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pidrt.errors import PidrtError
from pidrt.runtime.edits import Edit

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _open(data: bytes | str | Path, name: str) -> Image.Image:
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise PidrtError(f"cannot read {name} {data}: {exc.strerror or exc}") from exc
    try:
        im = Image.open(io.BytesIO(bytes(data)))
        im.load()
        return ImageOps.exif_transpose(im) or im
    except Image.DecompressionBombError as exc:
        raise PidrtError(f"{name} is too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PidrtError(f"cannot decode {name}: not a supported or intact image file ({exc})") from exc


def _alpha(im: Image.Image) -> np.ndarray | None:
    """Alpha [H, W] in [0, 1], or None for an image without transparency."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in _ALPHA_MODES:
        return None
    return np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255


def _repaint(im: Image.Image) -> np.ndarray:
    """The repaint weight [H, W] in [0, 1] of a mask image (the conventions in the module doc)."""
    alpha = _alpha(im)
    if alpha is not None:
        return 1 - alpha
    return np.asarray(im.convert("L"), dtype=np.float32) / 255


def read_edit(image: bytes | str | Path, mask: bytes | str | Path | None = None, strength: float = 1.0,
              size: tuple[int, int] | None = None) -> Edit:
    """An `Edit` from an image file (and a mask file); `size` = (width, height) of the generation
    (None: the image's own). Bad files, a mask of another size and a mask with nothing to repaint
    are PidrtErrors."""
    im = _open(image, "the image")
    repaint = None
    if mask is not None:
        m = _open(mask, "the mask")
        if m.size != im.size:
            raise PidrtError(f"the mask is {m.size[0]}x{m.size[1]} but the image is {im.size[0]}x{im.size[1]}; "
                             "give a mask of the image's size")
        repaint = _repaint(m)
    else:
        alpha = _alpha(im)
        if alpha is not None and alpha.min() < 0.5:  # transparent pixels: the image is its own mask
            repaint = 1 - alpha
    rgb = im.convert("RGB")
    if size is not None and tuple(size) != rgb.size:
        rgb = rgb.resize(tuple(size), Image.Resampling.LANCZOS)
        if repaint is not None:
            repaint = np.asarray(Image.fromarray(repaint, "F").resize(tuple(size), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()
    weight = None if repaint is None else torch.from_numpy(np.clip(repaint, 0, 1).astype(np.float32))
    return Edit(pixels, strength, weight)

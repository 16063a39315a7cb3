"""Image and mask files -> Edit: OpenAI's transparent-mask rule, diffusers' white-mask rule, sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pidrt.errors import PidrtError
from pidrt.runtime.edit_files import read_edit


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def box() -> np.ndarray:
    keep = np.zeros((48, 64), bool)
    keep[8:24, 16:40] = True
    return keep  # the region to repaint


def test_transparent_mask_pixels_are_repainted(photo):
    rgba = np.full((48, 64, 4), 255, np.uint8)
    rgba[box(), 3] = 0  # OpenAI: transparent = edit here
    edit = read_edit(png(photo), png(rgba, "RGBA"), strength=0.7)
    assert edit.strength == 0.7 and edit.image.shape == (3, 48, 64)
    assert torch.equal(edit.image, torch.from_numpy(photo / 255).permute(2, 0, 1).float())
    assert torch.equal(edit.repaint[0].bool(), torch.from_numpy(box()))


def test_grey_mask_white_is_repainted(photo):
    grey = np.where(box(), 255, 0).astype(np.uint8)
    assert torch.equal(read_edit(png(photo), png(grey)).repaint[0].bool(), torch.from_numpy(box()))


def test_image_transparency_is_its_own_mask(photo):
    rgba = np.concatenate([photo, np.full((48, 64, 1), 255, np.uint8)], -1)
    assert read_edit(png(rgba, "RGBA")).mask is None  # opaque: img2img of the whole image
    rgba[box(), 3] = 0
    assert torch.equal(read_edit(png(rgba, "RGBA")).repaint[0].bool(), torch.from_numpy(box()))


def test_resized_to_the_generation(photo, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png(photo))
    edit = read_edit(path, png(np.where(box(), 255, 0).astype(np.uint8)), size=(128, 96))
    assert edit.image.shape == (3, 96, 128) and edit.mask.shape == (96, 128)
    assert edit.repaint[0, 16:48, 32:80].all() and not edit.repaint[0, :12].any()


def test_bad_files_are_clear_errors(photo, tmp_path):
    with pytest.raises(PidrtError, match="mask is 32x32 but the image is 64x48"):
        read_edit(png(photo), png(np.zeros((32, 32), np.uint8)))
    with pytest.raises(PidrtError, match="nothing to repaint"):
        read_edit(png(photo), png(np.zeros((48, 64), np.uint8)))
    with pytest.raises(PidrtError, match="cannot decode the image"):
        read_edit(b"not an image")
    with pytest.raises(PidrtError, match="cannot decode the mask"):
        read_edit(png(photo), png(photo)[:40])
    with pytest.raises(PidrtError, match="cannot read the image"):
        read_edit(tmp_path / "missing.png")
    with pytest.raises(PidrtError, match="strength"):
        read_edit(png(photo), strength=1.5)

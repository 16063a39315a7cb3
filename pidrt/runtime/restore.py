"""Face restoration and super-resolution with an identity.

A low-resolution or degraded photo -> (optionally) upscaled -> face detected and FFHQ-aligned at
the model's resolution -> img2img of the aligned crop with the identity (or inpainting of the face
oval only) -> the result warped back into the photo through a feathered mask. Pixels where the
mask is 0 are the (upscaled) photo's own, exactly.

The identity-encoder paper (sec. 3.4, 4.2) reuses one identity conditioning for super-resolution
and inpainting; its conditional variant trains an extra encoder for the low-resolution input.
pidrt takes the training-free form that works with the models users have: the upscaled face is
the init image of an img2img (SDEdit) run whose strength sets how much is regenerated, and the
identity branch (any method: SCA, IP-Adapter, EAA) pulls the regenerated detail towards the
reference photos. The identity may be enrolled from the input photo itself.

`prepare_face` + `paste_back` are the two halves around a pipeline call, so a batching server can
run the crop like any other edit (`FaceTask.edit`); `restore_face` does all three for one photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pidrt.errors import PidrtError
from pidrt.identity import faces
from pidrt.identity.align import align_ffhq, apply_affine, ffhq_matrix, warp_affine
from pidrt.models.conditions import Condition, ScaleSchedule
from pidrt.runtime.edits import Edit
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

MAX_UPSCALE = 8.0


@dataclass(frozen=True)
class RestoreOptions:
    strength: float = 0.5  # img2img strength on the aligned face (1 regenerates it entirely)
    upscale: float = 1.0  # output size / input size: super-resolution of the whole photo
    face_only: bool = False  # inpaint only the face oval of the crop (else img2img of the whole crop)
    feather: float = 0.2  # paste-back ramp width, as a fraction of the pasted region's radius
    face_policy: str = "largest"  # "largest" or "error" (pidrt.identity.faces.select_face)
    detector: str = "auto"

    def __post_init__(self):
        if not 1.0 <= self.upscale <= MAX_UPSCALE:
            raise PidrtError(f"upscale must be in [1, {MAX_UPSCALE:g}]; got {self.upscale}")
        if not 0.0 < self.feather < 1.0:
            raise PidrtError(f"feather must be in (0, 1); got {self.feather}")


@dataclass
class FaceTask:
    """One face of a photo, prepared: the edit the pipeline runs and where its result goes back."""

    edit: Edit  # the aligned crop (and the face-oval mask with face_only)
    photo: np.ndarray  # the (upscaled) photo, RGB uint8 [H, W, 3]
    matrix: np.ndarray  # 2x3, photo pixel -> crop pixel
    weight: np.ndarray  # [H, W] float32 in [0, 1]: how much of the result a pixel takes (0: the photo's)
    face: faces.Face


@dataclass
class Restoration:
    image: np.ndarray  # the restored photo, RGB uint8 [H, W, 3] (upscaled when asked)
    crop: np.ndarray  # the generated aligned face, RGB uint8 [S, S, 3]
    weight: np.ndarray  # the paste-back weight [H, W]
    face: faces.Face


def _region(size: int, landmarks: np.ndarray, face_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Centre and radii, in crop pixels, of the ellipse that is regenerated and pasted back."""
    if not face_only:  # the circle inscribed in the crop: the corners are background
        return np.full(2, (size - 1) / 2), np.full(2, size / 2)
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:].mean(0)
    eye_dist = float(np.hypot(*(landmarks[1] - landmarks[0])))
    # From the brow to the chin and cheek to cheek, for a face aligned upright (FFHQ).
    return eyes + 0.45 * (mouth - eyes), np.array([1.0, 1.35]) * eye_dist


def _ellipse(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised radius of points [..., 2] (1 on the ellipse)."""
    return np.sqrt((((points - centre) / radii) ** 2).sum(-1))


def _pixels(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs, ys], -1).astype(np.float64)


def prepare_face(photo: np.ndarray | bytes | str | Path, size: int, options: RestoreOptions = RestoreOptions(),
                 face: faces.Face | None = None) -> FaceTask:
    """Upscale, detect (unless `face`, in upscaled coordinates, is given), align; the edit and its
    paste-back geometry. PidrtError when the photo has no face."""
    if not isinstance(photo, np.ndarray):
        photo = faces.load_image(photo, name="the photo to restore")
    if options.upscale != 1.0:
        h, w = photo.shape[:2]
        size_up = (round(w * options.upscale), round(h * options.upscale))
        photo = np.asarray(Image.fromarray(photo).resize(size_up, Image.Resampling.LANCZOS))
    if face is None:
        found = faces.detect_faces(photo, backend=options.detector)
        face = faces.select_face(found, options.face_policy, "the photo to restore")
    matrix = ffhq_matrix(face.landmarks5, size)
    crop = align_ffhq(photo, face.landmarks5, size)
    centre, radii = _region(size, apply_affine(matrix, face.landmarks5), options.face_only)
    mask = None
    if options.face_only:
        mask = torch.from_numpy((_ellipse(_pixels(size, size), centre, radii) <= 1).astype(np.float32))
    image = torch.from_numpy(crop.astype(np.float32) / 255).permute(2, 0, 1)
    # Where each photo pixel falls in the crop: 1 well inside the region, a linear ramp to 0 at its edge.
    r = _ellipse(apply_affine(matrix, _pixels(*photo.shape[:2]).reshape(-1, 2)), centre, radii)
    weight = np.clip((1 - r) / options.feather, 0, 1).reshape(photo.shape[:2]).astype(np.float32)
    return FaceTask(Edit(image, options.strength, mask), photo, matrix, weight, face)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A pipeline image [3, H, W] in [0, 1] as RGB uint8 [H, W, 3]."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def paste_back(task: FaceTask, crop: np.ndarray) -> np.ndarray:
    """The photo with `crop` (the generated aligned face, RGB uint8 [S, S, 3]) blended in by
    `task.weight`; pixels of weight 0 keep the photo's own bytes."""
    h, w = task.photo.shape[:2]
    back = np.linalg.inv(np.vstack([task.matrix, [0, 0, 1]]))[:2]
    warped = warp_affine(crop, back, (w, h)).astype(np.float32)
    wgt = task.weight[..., None]
    blended = np.rint(task.photo * (1 - wgt) + warped * wgt).clip(0, 255).astype(np.uint8)
    return np.where(wgt > 0, blended, task.photo)


def restore_face(pipe: Pipeline, config: SamplingConfig, photo, prompt: str, seed: int = 0,
                 condition: Condition | None = None, schedule: ScaleSchedule = ScaleSchedule(),
                 negative_prompt: str = "", options: RestoreOptions = RestoreOptions()) -> Restoration:
    """Restore the (largest) face of `photo` with the identity `condition`, at the model's square size."""
    if config.height != config.width:
        raise PidrtError(f"face restoration runs on a square crop; got {config.width}x{config.height}")
    task = prepare_face(photo, config.height, options)
    out = pipe.generate(config, [ImageSpec(prompt, seed, negative_prompt, condition, schedule, edit=task.edit)])
    crop = to_uint8(out.images[0])
    return Restoration(paste_back(task, crop), crop, task.weight, task.face)

"""A request's edit fields (init image, mask, strength, face restoration), resolved and checked.

`resolve_edit` turns a `GenerationRequest`'s edit fields into a `ResolvedEdit` at submission, so
every bad input is an `InvalidRequest` (HTTP 400, CLI exit 2) before the request is queued: an
unreadable image, a mask of another size or with nothing to repaint, a strength outside (0, 1]
or one that runs no step, a photo without a face for `restore_face`. The resolved `Edit` is data
of the request's images (`ImageSpec.edit`), so edits and plain generations of one shape share
batches; face restoration's detection and alignment run here, its paste-back (`ResolvedEdit.paste_back`) after
generation, on the image-encoding threads.

`inpainting` names the variant a masked edit asks for: "blend" (latent blending on a base
4-channel UNet) or "model" (a 9-channel inpainting UNet). None takes the server's UNet;
asking for the other one is refused by `check_variant` (the server cannot run it).

Default strengths: diffusers' pipelines' (0.8 img2img, 1.0 inpainting) and
`RestoreOptions.strength` (0.5) for face restoration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pidrt.errors import PidrtError
from pidrt.identity import faces
from pidrt.runtime.edit_files import read_edit
from pidrt.runtime.edits import Edit, is_inpainting_unet, start_step
from pidrt.runtime.requests import InvalidRequest
from pidrt.runtime.restore import MAX_UPSCALE, FaceTask, RestoreOptions, paste_back, prepare_face

VARIANTS = ("blend", "model")
# restore_face's output (the photo, upscaled) is held as uint8 RGB plus a float32 weight: 16 Mpx is
# about 300 MB; a bigger ask is refused before it is allocated.
MAX_RESTORED_PIXELS = 4096 * 4096
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0
_FACE_FIELDS = ("upscale", "face_only")


@dataclass(frozen=True)
class EditSummary:
    """What a result keeps of its edit once shipped or stored (no pixels): `ResolvedEdit.summary`."""

    strength: float
    start_step: int
    mask: bool
    restore_face: bool
    upscale: float
    face_only: bool
    inpainting: str | None

    def summary(self) -> "EditSummary":  # already light (a result shipped twice)
        return self

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class ResolvedEdit:
    edit: Edit  # what each image of the request starts from (the aligned face crop when restoring)
    start: int  # the first step it runs
    face: FaceTask | None = None  # restore_face: where the crop goes back
    upscale: float = 1.0
    inpainting: str | None = None

    def summary(self) -> EditSummary:
        masked = self.edit.mask is not None
        return EditSummary(self.edit.strength, self.start, masked, self.face is not None, self.upscale,
                           self.face is not None and masked, self.inpainting)

    def describe(self) -> dict:
        """What the request's JSON echo and the CLI's sidecar show."""
        return self.summary().describe()

    def paste_back(self, crops: np.ndarray) -> list[np.ndarray]:
        """restore_face: the generated face crops (RGB uint8 [S, S, 3]) pasted back into the photo."""
        return [paste_back(self.face, crop) for crop in crops]


def resolve_edit(req, width: int, height: int, steps: int, detector: str = "auto") -> ResolvedEdit | None:
    """The edit of `req` (a GenerationRequest) for a width x height, `steps`-step generation;
    None for a plain generation. InvalidRequest for anything that cannot run."""
    given = [name for name in ("mask", "strength", "upscale", "inpainting") if getattr(req, name) is not None]
    given += [name for name in ("restore_face", "face_only") if getattr(req, name)]
    if req.init_image is None:
        if given:
            raise InvalidRequest(f"{', '.join(given)}: only for an edit; give an init image (init_image)")
        return None
    strength = req.strength
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                 or not math.isfinite(strength) or not 0 < strength <= 1):
        raise InvalidRequest(f"strength must be a number in (0, 1]; got {strength!r}")
    if req.inpainting is not None and req.inpainting not in VARIANTS:
        raise InvalidRequest(f"inpainting must be one of {list(VARIANTS)}; got {req.inpainting!r}")
    face, upscale = None, 1.0
    try:
        if req.restore_face:
            face, upscale = _restore(req, width, height, strength, detector)
            edit = face.edit
        else:
            if any(getattr(req, name) for name in _FACE_FIELDS):
                raise InvalidRequest(f"{' and '.join(n for n in _FACE_FIELDS if getattr(req, n))} "
                                     "apply to restore_face only")
            if strength is None:
                strength = IMG2IMG_STRENGTH if req.mask is None else INPAINT_STRENGTH
            edit = read_edit(req.init_image, req.mask, strength, (width, height))
        if req.inpainting is not None and edit.mask is None:
            raise InvalidRequest(f"inpainting={req.inpainting!r} needs a mask (or a transparent region) to repaint")
        start = start_step(steps, edit.strength)
    except InvalidRequest:
        raise
    except PidrtError as exc:  # unreadable files, no face, a strength that runs no step, ...
        raise InvalidRequest(str(exc)) from None
    return ResolvedEdit(edit, start, face, upscale, req.inpainting)


def _restore(req, width: int, height: int, strength: float | None, detector: str) -> tuple[FaceTask, float]:
    """The prepared face of a restore_face request, and its upscale."""
    if req.mask is not None:
        raise InvalidRequest("restore_face takes no mask: it repaints the aligned face (face_only: its oval)")
    if width != height:
        raise InvalidRequest(f"restore_face runs on a square face crop; got size {width}x{height}")
    upscale = 1.0 if req.upscale is None else req.upscale
    if isinstance(upscale, bool) or not isinstance(upscale, (int, float)) or not math.isfinite(upscale):
        raise InvalidRequest(f"upscale must be a number in [1, {MAX_UPSCALE:g}]; got {upscale!r}")
    kw = {} if strength is None else {"strength": float(strength)}
    options = RestoreOptions(upscale=float(upscale), face_only=bool(req.face_only), detector=detector, **kw)
    photo = faces.load_image(req.init_image, name="the photo to restore")
    h, w = (round(side * options.upscale) for side in photo.shape[:2])
    if h * w > MAX_RESTORED_PIXELS:
        raise InvalidRequest(f"restoring would make a {w}x{h} photo; the limit is {MAX_RESTORED_PIXELS // 10**6} "
                             "megapixels: lower upscale or send a smaller photo")
    return prepare_face(photo, width, options), options.upscale


def check_variant(edit: ResolvedEdit | None, pipe) -> None:
    """Refuse an inpainting variant the server's UNet cannot run (InvalidRequest)."""
    if edit is None or edit.inpainting is None:
        return
    has_model = is_inpainting_unet(pipe)
    if edit.inpainting == "model" and not has_model:
        raise InvalidRequest("inpainting='model' needs an SD1.5 inpainting UNet and this model's is a base one; "
                             "load one (a server: start it) with --preset sd15-inpainting or --model <an inpainting "
                             "checkpoint>, or ask for inpainting='blend'")
    if edit.inpainting == "blend" and has_model:
        raise InvalidRequest("this model's UNet is an inpainting UNet, which repaints through its mask channels and "
                             "does not latent-blend; ask for inpainting='model' or leave inpainting out")


def add_edit_arguments(p) -> None:
    """`pidrt generate`'s edit options (the request's edit fields)."""
    from pathlib import Path

    p.add_argument("--init-image", type=Path, help="edit this photo: img2img, inpainting with --mask, or --restore-face")
    p.add_argument("--mask", type=Path, help="the region to repaint: transparent pixels (with alpha) or white")
    p.add_argument("--strength", type=float, help="how much is regenerated, in (0, 1] (default 0.8 img2img, "
                                                  "1.0 inpainting, 0.5 --restore-face)")
    p.add_argument("--restore-face", action="store_true",
                   help="detect and align the face of --init-image, regenerate it, paste it back")
    p.add_argument("--upscale", type=float, help="--restore-face: enlarge the photo first, in [1, 8] (default 1)")
    p.add_argument("--face-only", action="store_true", help="--restore-face: repaint only the face oval")
    p.add_argument("--inpainting", choices=VARIANTS,
                   help="refuse a masked edit unless the model inpaints this way (default: the model's)")


def edit_fields(a) -> dict:
    """The GenerationRequest fields of `add_edit_arguments`' options."""
    return {"init_image": a.init_image, "mask": a.mask, "strength": a.strength, "restore_face": a.restore_face,
            "upscale": a.upscale, "face_only": a.face_only, "inpainting": a.inpainting}

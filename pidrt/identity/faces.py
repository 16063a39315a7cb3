"""Reference photos -> faces -> crops: image loading, face detection, selection, preprocessing.

Detector backends (``detect_faces(..., backend=...)``), tried in this order by ``"auto"``:

* ``"insightface"``: InsightFace ``FaceAnalysis`` (SCRFD detector, 5 landmarks) with a model
  pack found at a given folder or ``~/.insightface/models/<name>`` (default ``buffalo_l``).
  pidrt never downloads a pack: put it there yourself.
* ``"mtcnn"``: MTCNN with 5 real landmarks (:mod:`pidrt.identity.mtcnn`), offline; its weights
  come from the ``facenet-pytorch`` wheel (``pip install --no-deps facenet-pytorch==2.6.0``).
* ``"haar"``: OpenCV 4.x Haar cascades (shipped in ``opencv-python-headless<5`` wheels), the
  last resort. Only the face box and, when the eye cascade finds them, the two eye centres are
  measured; the nose and mouth corners (and the eyes when no eye pair is found) are *estimated*
  by mapping the ArcFace template through the eye positions (or fixed proportions of the box).
  ``Face.detector`` says which: ``"haar+eyes"`` or ``"haar"``.

Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (image left).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pidrt.errors import MissingDependencyError, PidrtError, require
from pidrt.identity.align import ARCFACE_TEMPLATE, align_ffhq, arcface_crop, similarity_transform, square_crop

MIN_SIDE = 64
DEFAULT_PACK = "buffalo_l"
BACKENDS = ("auto", "insightface", "mtcnn", "haar")


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face: box [4] = x1, y1, x2, y2; landmarks5 [5, 2]; score (the detector's own
    confidence; for Haar, the cascade's neighbour count); detector: which backend measured it;
    extra: backend extras (insightface: "embedding", the normalised ArcFace embedding)."""

    box: np.ndarray
    landmarks5: np.ndarray
    score: float
    detector: str
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


# ---------------------------------------------------------------------------- image loading
def _to_rgb8(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (the rules are listed in load_image)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr * (255.0 / 65535.0)
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return im.convert("RGB")


def _plain(exc: BaseException) -> str:
    """An exception's text without Python object reprs (`<_io.BytesIO object at 0x...>`)."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the data", str(exc)) or type(exc).__name__


def load_image(data: bytes | str | Path | Image.Image, name: str | None = None) -> np.ndarray:
    """Read a photo into an RGB uint8 array [H, W, 3].

    EXIF orientation is applied; a multi-frame file gives its first frame. Conversions:
    RGBA / LA / PA and palette images with transparency are alpha-composited on white;
    16-bit grayscale (I;16*) is scaled by 255/65535 (16-bit RGB PNGs are reduced to 8 bits by
    Pillow itself); 32-bit integer (I) is scaled the same way when its maximum exceeds 255,
    kept otherwise; float (F) in [0, 1] is scaled by 255, other float data clipped to 0-255;
    grayscale, 1-bit, palette, CMYK, YCbCr, LAB and HSV use Pillow's RGB conversion.
    Raises PidrtError for unreadable, corrupt or truncated data, too-large (decompression
    bomb) images and images with a side under 64 px."""
    if isinstance(data, (str, Path)):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise PidrtError(f"cannot read image {name}: {exc.strerror or exc}") from exc
    name = name or "image"
    try:
        if isinstance(data, Image.Image):
            im = data
        elif isinstance(data, (bytes, bytearray, memoryview)):
            im = Image.open(io.BytesIO(bytes(data)))
        else:
            raise PidrtError(f"load_image takes bytes, a path or a PIL image, not {type(data).__name__}")
        im.load()
        im = ImageOps.exif_transpose(im) or im
        rgb = _to_rgb8(im)
    except PidrtError:
        raise
    except Image.DecompressionBombError as exc:
        raise PidrtError(f"image {name} is too large: {_plain(exc)}") from exc
    except UnidentifiedImageError as exc:  # its text is only the repr of our in-memory buffer
        raise PidrtError(f"cannot decode image {name}: not an image format Pillow reads "
                         "(PNG, JPEG, WebP, BMP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PidrtError(f"cannot decode image {name}: not a supported or intact image file ({_plain(exc)})") from exc
    if min(rgb.size) < MIN_SIDE:
        raise PidrtError(f"image {name} is {rgb.size[0]}x{rgb.size[1]}: faces need at least {MIN_SIDE} px a side")
    return np.asarray(rgb, dtype=np.uint8).copy()


# ---------------------------------------------------------------------------- detection
def find_model_pack(pack: str | Path | None = None) -> Path | None:
    """An InsightFace model pack folder: ``pack`` itself when it is a folder, else
    ``~/.insightface/models/<pack>`` (default buffalo_l). None when absent."""
    pack = pack or DEFAULT_PACK
    direct = Path(pack).expanduser()
    if direct.is_dir():
        return direct.resolve()
    home = Path("~/.insightface/models").expanduser() / str(pack)
    return home if home.is_dir() else None


_FA_CACHE: dict = {}


def _face_analysis(pack, det_size=(640, 640)):
    insightface_app = require("insightface.app", "face")
    folder = find_model_pack(pack)
    if folder is None:
        raise PidrtError(
            f"insightface model pack {pack or DEFAULT_PACK!r} not found (looked for a folder and in "
            "~/.insightface/models/); pidrt does not download packs: unpack one there"
        )
    key = (str(folder), tuple(det_size))
    if key not in _FA_CACHE:
        try:
            fa = insightface_app.FaceAnalysis(
                name=str(folder), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"]
            )
            fa.prepare(ctx_id=-1, det_size=tuple(det_size))
        except Exception as exc:  # insightface asserts on packs without a detector, onnxruntime raises its own
            raise PidrtError(f"cannot load insightface model pack {folder}: {type(exc).__name__}: {exc}") from exc
        _FA_CACHE[key] = fa
    return _FA_CACHE[key], folder


def _detect_insightface(img, pack) -> list[Face]:
    fa, folder = _face_analysis(pack)
    out = []
    for f in fa.get(np.ascontiguousarray(img[:, :, ::-1])):  # insightface expects BGR
        emb = getattr(f, "normed_embedding", None)
        extra = {"embedding": np.asarray(emb, np.float32)} if emb is not None else {}
        out.append(Face(np.asarray(f.bbox, np.float32), np.asarray(f.kps, np.float32),
                        float(f.det_score), f"insightface/{folder.name}", extra))  # fmt: skip
    return out


def _detect_mtcnn(img, weights_dir, min_face: int) -> list[Face]:
    from pidrt.identity.mtcnn import get_mtcnn

    boxes, points = get_mtcnn(weights_dir).detect(img, min_face=max(int(min_face), 12))
    return [Face(b[:4].copy(), p.copy(), float(b[4]), "mtcnn") for b, p in zip(boxes, points)]


# Eye centres of a frontal face inside an OpenCV default-cascade box, as fractions of the box
# (measured against MTCNN landmarks on insightface's t1.jpg and skimage's astronaut).
_HAAR_EYES = np.array([[0.31, 0.38], [0.69, 0.38]])


def _landmarks_from_eyes(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    m = similarity_transform(ARCFACE_TEMPLATE[:2], np.stack([left, right]))
    return ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]


def _detect_haar(img, min_face: int) -> list[Face]:
    cv2 = require("cv2", "face")
    root = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "")
    face_xml, eye_xml = root / "haarcascade_frontalface_default.xml", root / "haarcascade_eye.xml"
    if not face_xml.is_file():
        raise MissingDependencyError(
            f"OpenCV {cv2.__version__} ships no Haar cascades (opencv 5 wheels dropped them); "
            "install 'opencv-python-headless>=4.8,<5' (pip install 'pidrt[face]')"
        )
    face_cc, eye_cc = cv2.CascadeClassifier(str(face_xml)), cv2.CascadeClassifier(str(eye_xml))
    gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    boxes, neighbours = face_cc.detectMultiScale2(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    out = []
    for (x, y, w, h), n in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(neighbours).reshape(-1)):
        roi = gray[y : y + int(h * 0.6), x : x + w]
        eyes = eye_cc.detectMultiScale(roi, 1.1, 3, minSize=(max(w // 10, 5),) * 2, maxSize=(w // 2, w // 2))
        centres = [np.array([ex + ew / 2, ey + eh / 2]) for ex, ey, ew, eh in np.asarray(eyes).reshape(-1, 4)]
        centres = [c for c in centres if 0.2 * h <= c[1] <= 0.55 * h]
        left = [c for c in centres if c[0] < 0.5 * w]
        right = [c for c in centres if c[0] >= 0.5 * w]
        if left and right:
            el = min(left, key=lambda c: np.hypot(*(c / [w, h] - _HAAR_EYES[0])))
            er = min(right, key=lambda c: np.hypot(*(c / [w, h] - _HAAR_EYES[1])))
            lm, det = _landmarks_from_eyes(el + [x, y], er + [x, y]), "haar+eyes"
        else:
            eyes_xy = _HAAR_EYES * [w, h] + [x, y]
            lm, det = _landmarks_from_eyes(eyes_xy[0], eyes_xy[1]), "haar"
        box = np.array([x, y, x + w, y + h], np.float32)
        out.append(Face(box, lm.astype(np.float32), float(n), det))
    return out


def available_backend(model_pack=None, mtcnn_dir=None) -> str:
    """The backend ``"auto"`` picks: insightface (importable and a pack present), else mtcnn
    (weights present), else haar (OpenCV importable). MissingDependencyError when none is."""
    from importlib.util import find_spec

    from pidrt.identity.mtcnn import find_mtcnn_weights

    if find_spec("insightface") is not None and find_model_pack(model_pack) is not None:
        return "insightface"
    if find_spec("torch") is not None and find_mtcnn_weights(mtcnn_dir) is not None:
        return "mtcnn"
    if find_spec("cv2") is not None:
        return "haar"
    raise MissingDependencyError(
        "no face detector available: install pidrt[face] (OpenCV Haar cascades), and for real "
        "landmarks 'pip install --no-deps facenet-pytorch==2.6.0' (MTCNN weights) or an insightface pack"
    )


def detector_report(model_pack=None, mtcnn_dir=None) -> dict[str, str]:
    """Each detector backend: available (with what it uses) or what is missing; `auto`'s pick."""
    from importlib.util import find_spec

    from pidrt.identity.mtcnn import find_mtcnn_weights

    out = {}
    pack = find_model_pack(model_pack)
    if find_spec("insightface") is None:
        out["insightface"] = "missing (pip install 'pidrt[face]')"
    else:
        out["insightface"] = f"available ({pack})" if pack else \
            f"no model pack (put one at ~/.insightface/models/{DEFAULT_PACK}; nothing is downloaded)"
    weights = find_mtcnn_weights(mtcnn_dir)
    out["mtcnn"] = f"available ({weights})" if weights else \
        "no weights (pip install --no-deps facenet-pytorch==2.6.0, or set PIDRT_MTCNN_DIR)"
    out["haar"] = "available (OpenCV Haar cascades)" if find_spec("cv2") else "missing (pip install 'pidrt[face]')"
    try:
        out["auto"] = f"uses {available_backend(model_pack, mtcnn_dir)}"
    except MissingDependencyError:
        out["auto"] = "no detector available"
    return out


def detect_faces(
    img: np.ndarray,
    backend: str = "auto",
    *,
    model_pack: str | Path | None = None,
    mtcnn_dir: str | Path | None = None,
    min_face: int = 40,
    min_score: float = 0.0,
) -> list[Face]:
    """Detect faces in an RGB uint8 image; largest first. Faces narrower than ``min_face`` px or
    scoring under ``min_score`` are dropped."""
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise PidrtError("detect_faces expects an RGB uint8 array [H, W, 3] (use load_image)")
    if backend not in BACKENDS:
        raise PidrtError(f"unknown face detector backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = available_backend(model_pack, mtcnn_dir)
    if backend == "insightface":
        faces = _detect_insightface(img, model_pack)
    elif backend == "mtcnn":
        faces = _detect_mtcnn(img, mtcnn_dir, min_face)
    else:
        faces = _detect_haar(img, min_face)
    faces = [f for f in faces if f.box[2] - f.box[0] >= min_face and f.score >= min_score]
    return sorted(faces, key=lambda f: -f.area)


def select_face(faces: list[Face], policy: str = "largest", name: str = "image") -> Face:
    """One face out of a detection: none -> PidrtError; several -> the largest ("largest") or
    PidrtError ("error")."""
    if policy not in ("largest", "error"):
        raise PidrtError(f"unknown face selection policy {policy!r}; use 'largest' or 'error'")
    if not faces:
        raise PidrtError(f"no face found in {name}")
    if len(faces) > 1 and policy == "error":
        raise PidrtError(f"{len(faces)} faces found in {name}; give a photo with one face or use policy 'largest'")
    return max(faces, key=lambda f: f.area)


# ---------------------------------------------------------------------------- crops
METHODS = ("pidiff", "inv_adapter", "arcface", "all")


def _apply_background_removal(crop: np.ndarray, hook: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run the hook; it returns either an RGB image of the crop's shape (used as is) or a
    foreground mask [H, W] (float in [0, 1] or uint8 0-255), composited on white."""
    out = np.asarray(hook(crop))
    if out.shape == crop.shape:
        return np.clip(out, 0, 255).astype(np.uint8)
    if out.shape == crop.shape[:2]:
        mask = out.astype(np.float32) / (255.0 if out.dtype == np.uint8 else 1.0)
        mask = np.clip(mask, 0.0, 1.0)[..., None]
        return np.rint(crop * mask + 255.0 * (1.0 - mask)).astype(np.uint8)
    raise PidrtError(f"background_removal returned shape {out.shape}; expected {crop.shape} or {crop.shape[:2]}")


def preprocess(
    img: np.ndarray,
    method: str = "all",
    *,
    face: Face | None = None,
    policy: str = "largest",
    name: str = "image",
    background_removal: Callable[[np.ndarray], np.ndarray] | None = None,
    **detect_kwargs,
) -> dict[str, np.ndarray]:
    """Detect (unless ``face`` is given), select, and crop for a method.

    Keys: ``"ffhq256"`` (pidiff: FFHQ-aligned 256x256, the e4e input; background removed by the
    hook when given), ``"face512"`` (inv_adapter: square crop), ``"arcface112"`` (arcface),
    plus ``"box"`` [4] and ``"landmarks5"`` [5, 2] always.
    """
    if method not in METHODS:
        raise PidrtError(f"unknown preprocessing method {method!r}; choose one of {METHODS}")
    if face is None:
        face = select_face(detect_faces(img, **detect_kwargs), policy, name)
    out = {"box": np.asarray(face.box, np.float32), "landmarks5": np.asarray(face.landmarks5, np.float32)}
    if method in ("pidiff", "all"):
        crop = align_ffhq(img, face.landmarks5, 256)
        out["ffhq256"] = crop if background_removal is None else _apply_background_removal(crop, background_removal)
    if method in ("inv_adapter", "all"):
        out["face512"] = square_crop(img, face.box, 512)
    if method in ("arcface", "all"):
        out["arcface112"] = arcface_crop(img, face.landmarks5)
    return out


def arcface_embedding(crop: np.ndarray, model_pack: str | Path | None = None) -> np.ndarray:
    """L2-normalised ArcFace embedding [512] of a 112x112 RGB ArcFace crop, with the recognition
    model of an InsightFace pack (needs insightface and the pack; nothing is downloaded)."""
    if not isinstance(crop, np.ndarray) or crop.shape != (112, 112, 3) or crop.dtype != np.uint8:
        raise PidrtError("arcface_embedding expects a 112x112 RGB uint8 crop (use arcface_crop)")
    fa, folder = _face_analysis(model_pack)
    rec = fa.models.get("recognition")
    if rec is None:
        raise PidrtError(f"insightface model pack {folder} has no recognition model")
    feat = np.asarray(rec.get_feat(np.ascontiguousarray(crop[:, :, ::-1])), np.float32).reshape(-1)
    return feat / max(float(np.linalg.norm(feat)), 1e-12)

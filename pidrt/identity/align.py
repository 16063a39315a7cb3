"""Face crops from five landmarks: FFHQ alignment (e4e / PIDiff), ArcFace 112x112, square crops.

Landmark order everywhere in pidrt (the InsightFace / MTCNN order), in image coordinates (x, y):
0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner, 4 right mouth corner, where "left"
means the side that is on the left of the image (the subject's right eye).

Only numpy and Pillow are used here, so crops work without the ``face`` extra; the Gaussian
blur of FFHQ's padding uses scipy when it is importable and Pillow's otherwise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pidrt.errors import PidrtError

# The standard ArcFace 5-point template for 112x112 crops (InsightFace's `arcface_dst`).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def _check_lm5(lm5) -> np.ndarray:
    lm = np.asarray(lm5, dtype=np.float64)
    if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
        raise PidrtError(f"expected 5 finite (x, y) landmarks, got an array of shape {lm.shape}")
    return lm


def _check_img(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise PidrtError("expected an RGB uint8 image of shape [H, W, 3] (use load_image)")
    return img


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama's closed form (the method of skimage's SimilarityTransform.estimate). Returns the
    2x3 matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s_c**2).sum() / n
    if var_s <= 0:
        raise PidrtError("degenerate landmarks: all points coincide")
    scale = (sig * sign).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def apply_affine(m: np.ndarray, pts) -> np.ndarray:
    """Apply a 2x3 affine matrix to points [N, 2]."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def warp_affine(img: np.ndarray, m: np.ndarray, size: tuple[int, int], fill=(0, 0, 0)) -> np.ndarray:
    """Warp ``img`` by the forward 2x3 matrix ``m`` (source -> output) into ``size`` = (w, h)."""
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    # Pillow samples at pixel centres offset by 0.5; convert the pixel-index convention used by
    # landmarks (and OpenCV's warpAffine) to Pillow's.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    unshift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    pil_m = (shift @ np.vstack([inv, [0, 0, 1]]) @ unshift)[:2].flatten()
    out = Image.fromarray(img).transform(
        size, Image.Transform.AFFINE, tuple(pil_m), resample=Image.Resampling.BILINEAR, fillcolor=tuple(fill)
    )
    return np.asarray(out)


def arcface_matrix(lm5, size: int = 112) -> np.ndarray:
    """The 2x3 similarity transform that ArcFace alignment applies (template scaled to ``size``)."""
    lm = _check_lm5(lm5)
    if size % 112 != 0 and size % 128 != 0:
        raise PidrtError(f"ArcFace crops are 112 (or 128) pixel multiples, got {size}")
    if size % 112 == 0:
        dst = ARCFACE_TEMPLATE * (size / 112.0)
    else:  # the 128 variant used by some InsightFace models shifts the template by 8 px
        dst = ARCFACE_TEMPLATE * (size / 128.0) + np.array([8.0 * size / 128.0, 0.0])
    return similarity_transform(lm, dst)


def arcface_crop(img: np.ndarray, lm5, size: int = 112) -> np.ndarray:
    """ArcFace crop: similarity transform of the 5 landmarks onto the standard template."""
    _check_img(img)
    return warp_affine(img, arcface_matrix(lm5, size), (size, size))


def ffhq_quad(lm5) -> tuple[np.ndarray, float]:
    """The oriented crop quad of the FFHQ alignment script, from eye centres and mouth corners.

    Returns (quad [4, 2] corners: top-left, bottom-left, bottom-right, top-right; qsize).
    """
    lm = _check_lm5(lm5)
    eye_left, eye_right = lm[0], lm[1]
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[3] + lm[4]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if norm < 1e-6:
        raise PidrtError("degenerate landmarks: cannot orient the FFHQ crop")
    x = x / norm
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def ffhq_matrix(lm5, size: int = 256) -> np.ndarray:
    """The similarity transform (image -> output square) that :func:`align_ffhq` applies."""
    quad, _ = ffhq_quad(lm5)
    # Pillow maps quad + 0.5 (continuous coordinates) onto the output corners (0, 0), (0, size),
    # (size, size), (size, 0); in pixel-index coordinates that is quad -> corners - 0.5.
    out = np.array([[0, 0], [0, size], [size, size], [size, 0]], dtype=np.float64) - 0.5
    return similarity_transform(quad, out)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    try:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(img, [sigma, sigma, 0])
    except ImportError:
        pil = Image.fromarray(np.uint8(np.clip(np.rint(img), 0, 255)))
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)


def align_ffhq(img: np.ndarray, lm5, size: int = 256, transform_size: int | None = None) -> np.ndarray:
    """FFHQ-style alignment (the StyleGAN / e4e preprocessing) from 5 landmarks.

    Follows the FFHQ alignment script: oriented quad from eye_avg, eye_to_eye, eye_to_mouth;
    shrink when the face is much larger than the output, crop with a border, reflect-pad with a
    blurred, median-faded border when the quad leaves the image, then a quad transform onto the
    ``transform_size`` square (default ``size``) and a Lanczos resize to ``size``. With 5-point
    landmarks the eye centres and mouth corners are used directly (the script averages the
    68-point eye contours, which lands on the same centres).
    """
    _check_img(img)
    transform_size = transform_size or size
    quad, qsize = ffhq_quad(lm5)
    pil = Image.fromarray(img)

    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(pil.size[0]) / shrink)), int(np.rint(float(pil.size[1]) / shrink)))
        pil = pil.resize(rsize, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, pil.size[0]),
        min(crop[3] + border, pil.size[1]),
    )
    if crop[2] - crop[0] < pil.size[0] or crop[3] - crop[1] < pil.size[1]:
        pil = pil.crop(crop)
        quad -= crop[0:2]

    pad = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    pad = (
        max(-pad[0] + border, 0),
        max(-pad[1] + border, 0),
        max(pad[2] - pil.size[0] + border, 0),
        max(pad[3] - pil.size[1] + border, 0),
    )
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(pil), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
        )
        blur = qsize * 0.02
        arr += (_blur(arr, blur) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        pil = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad += pad[:2]

    pil = pil.transform(
        (transform_size, transform_size),
        Image.Transform.QUAD,
        tuple((quad + 0.5).flatten()),
        Image.Resampling.BILINEAR,
    )
    if size != transform_size:
        pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(pil)


def square_crop(img: np.ndarray, box, size: int = 512, margin: float = 0.4) -> np.ndarray:
    """A square crop around a face box, enlarged by ``margin`` (fraction of the box side on
    each side), resized to ``size``. Parts outside the image are filled by edge replication.
    This is the face crop I_f that Inv-Adapter inverts."""
    _check_img(img)
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    if not (x1 > x0 and y1 > y0):
        raise PidrtError(f"invalid face box {box!r}")
    if margin < 0:
        raise PidrtError("margin must be >= 0")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    left, top = int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2))
    side_i = max(int(np.ceil(side)), 1)
    h, w = img.shape[:2]
    pl, pt = max(0, -left), max(0, -top)
    pr, pb = max(0, left + side_i - w), max(0, top + side_i - h)
    padded = np.pad(img, ((pt, pb), (pl, pr), (0, 0)), mode="edge") if (pl or pt or pr or pb) else img
    patch = padded[top + pt : top + pt + side_i, left + pl : left + pl + side_i]
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.LANCZOS))

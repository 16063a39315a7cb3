"""Faces on real photos: insightface's t1.jpg (six people) and Tom_Hanks_54745.png (an ArcFace
crop), scikit-image's astronaut (one face) and coffee (no face).

Haar needs OpenCV 4.x with its cascades (the `test` extra pins it). MTCNN needs the weights of
the facenet-pytorch wheel, installed beside the extra (``pip install --no-deps
facenet-pytorch==2.6.0``, as the README's test command does): the tests that need them are marked
`needs_mtcnn` and skip without them, a skip that tests/conftest.py's skip gate refuses.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image
from scipy.ndimage import gaussian_filter

from pidrt.errors import PidrtError
from pidrt.identity import align
from pidrt.identity.faces import (
    Face,
    arcface_embedding,
    detect_faces,
    find_model_pack,
    load_image,
    preprocess,
    select_face,
)
from pidrt.identity.mtcnn import find_mtcnn_weights

# Face centres in t1.jpg (x, y), measured once with MTCNN and checked by eye.
T1_FACES = np.array([[960, 132], [110, 330], [793, 410], [322, 211], [518, 333], [1181, 336]], dtype=float)


INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"  # t1.jpg, Tom_Hanks_54745.png

needs_mtcnn = pytest.mark.skipif(find_mtcnn_weights() is None,
                                 reason="MTCNN weights absent: pip install --no-deps facenet-pytorch==2.6.0")
BACKENDS = [pytest.param("mtcnn", marks=needs_mtcnn), "haar"]


@pytest.fixture(scope="module")
def t1_path() -> Path:
    return INSIGHTFACE_IMAGES / "t1.jpg"


@pytest.fixture(scope="module")
def t1(t1_path) -> np.ndarray:
    return load_image(t1_path)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


_cache: dict = {}


def _detect(name, img, backend, **kw):
    key = (name, backend, tuple(sorted(kw.items())))
    if key not in _cache:
        _cache[key] = detect_faces(img, backend, **kw)
    return _cache[key]


def _png(arr_or_img, mode=None) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img, mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- load_image
def test_load_image_path_and_bytes(t1_path):
    a = load_image(t1_path)
    b = load_image(t1_path.read_bytes())
    assert a.shape == (886, 1280, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_load_image_rejects_corrupt_truncated_missing_and_tiny(t1_path, astronaut):
    with pytest.raises(PidrtError, match="cannot decode"):
        load_image(b"this is not an image at all", name="notes.txt")
    data = t1_path.read_bytes()
    with pytest.raises(PidrtError, match="cannot decode image half.jpg"):
        load_image(data[: len(data) // 2], name="half.jpg")
    with pytest.raises(PidrtError, match="cannot read image"):
        load_image(t1_path.with_name("does-not-exist.jpg"))
    tiny = np.asarray(Image.fromarray(astronaut).resize((16, 16)))
    with pytest.raises(PidrtError, match="16x16.*64 px"):
        load_image(_png(tiny))


def test_load_image_rgba_composited_on_white(astronaut):
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:, :256, 3] = 0  # left half fully transparent
    rgba[:, 256:300, 3] = 128  # a half-transparent band
    out = load_image(_png(rgba, "RGBA"))
    assert out.shape == astronaut.shape
    assert (out[:, :256] == 255).all()
    assert np.array_equal(out[:, 300:], astronaut[:, 300:])
    expected = (astronaut[:, 256:300].astype(float) * 128 + 255 * 127) / 255
    assert np.abs(out[:, 256:300] - expected).max() <= 1.5


def test_load_image_grayscale_palette_and_16bit(astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    out = load_image(_png(gray, "L"))
    assert out.shape == (512, 512, 3) and (out == gray[..., None]).all()

    g16 = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit grayscale PNG (mode I;16)
    assert g16.mode == "I;16"
    out16 = load_image(_png(g16))
    assert out16.dtype == np.uint8 and np.abs(out16[..., 0].astype(int) - gray).max() <= 1

    pal = Image.fromarray(astronaut).quantize(64)
    out_p = load_image(_png(pal))
    assert np.array_equal(out_p, np.asarray(pal.convert("RGB")))


def test_load_image_16bit_rgb_png(astronaut):
    ok, buf = cv2.imencode(".png", astronaut[:, :, ::-1].astype(np.uint16) * 257)
    assert ok
    out = load_image(buf.tobytes())
    assert np.abs(out.astype(int) - astronaut).max() <= 1


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("backend", BACKENDS)
def test_detect_several_faces_in_t1(t1, backend):
    faces = _detect("t1", t1, backend)
    centres = np.array([(f.box[:2] + f.box[2:]) / 2 for f in faces])
    hits = [np.linalg.norm(centres - c, axis=1).min() < 40 for c in T1_FACES]
    assert sum(hits) >= (6 if backend == "mtcnn" else 3), (backend, centres)
    assert all(isinstance(f, Face) and f.landmarks5.shape == (5, 2) for f in faces)
    assert all(f.detector.startswith(backend) for f in faces)
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)

    chosen = select_face(faces, "largest", name="t1.jpg")
    assert chosen.area == max(f.area for f in faces)
    assert np.linalg.norm(T1_FACES - (chosen.box[:2] + chosen.box[2:]) / 2, axis=1).min() < 40
    with pytest.raises(PidrtError, match=r"\d+ faces found in t1.jpg"):
        select_face(faces, "error", name="t1.jpg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_detect_one_face_in_astronaut(astronaut, backend):
    faces = _detect("astronaut", astronaut, backend)
    assert len(faces) == 1
    face = select_face(faces, "error", name="astronaut")
    lm = face.landmarks5
    # hand-checked eye centres of the astronaut photo
    assert np.linalg.norm(lm[0] - [205, 102]) < 10 and np.linalg.norm(lm[1] - [247, 104]) < 10
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above nose above mouth
    x1, y1, x2, y2 = face.box
    assert x1 <= lm[:, 0].min() and lm[:, 0].max() <= x2 and y1 <= lm[:, 1].min() and lm[:, 1].max() <= y2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_face_in_coffee(backend):
    faces = detect_faces(skdata.coffee(), backend)
    assert faces == []
    with pytest.raises(PidrtError, match="no face found in coffee.png"):
        select_face(faces, name="coffee.png")


def test_detect_rejects_bad_arguments(astronaut):
    with pytest.raises(PidrtError, match="RGB uint8"):
        detect_faces(astronaut.astype(np.float32))
    with pytest.raises(PidrtError, match="unknown face detector backend"):
        detect_faces(astronaut, "dlib")
    with pytest.raises(PidrtError, match="selection policy"):
        select_face([], "smallest")


def test_insightface_pack_missing_is_a_clear_error(astronaut, tmp_path):
    missing = tmp_path / "no-such-pack"
    assert find_model_pack(missing) is None
    with pytest.raises(PidrtError, match="model pack .* not found"):
        detect_faces(astronaut, "insightface", model_pack=missing)
    with pytest.raises(PidrtError, match="not found"):
        arcface_embedding(np.zeros((112, 112, 3), np.uint8), model_pack=missing)
    with pytest.raises(PidrtError, match="112x112"):
        arcface_embedding(np.zeros((100, 100, 3), np.uint8), model_pack=missing)
    empty = tmp_path / "empty-pack"
    empty.mkdir()
    (empty / "readme.txt").write_text("no models here")
    with pytest.raises(PidrtError, match="cannot load insightface model pack"):
        detect_faces(astronaut, "insightface", model_pack=empty)


# ----------------------------------------------------------------------------- crops
@needs_mtcnn
def test_arcface_crop_matches_template_and_opencv(astronaut):
    face = _detect("astronaut", astronaut, "mtcnn")[0]
    m = align.arcface_matrix(face.landmarks5)
    # the similarity fit puts a real face's landmarks within a few pixels of the template
    assert np.abs(align.apply_affine(m, face.landmarks5) - align.ARCFACE_TEMPLATE).max() < 6
    crop = align.arcface_crop(astronaut, face.landmarks5)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    ref = cv2.warpAffine(astronaut, m, (112, 112), flags=cv2.INTER_LINEAR)
    assert np.abs(crop.astype(int) - ref).mean() < 1.0


@needs_mtcnn
def test_hanks_arcface_crop_is_a_fixed_point():
    """Tom_Hanks_54745.png is already an ArcFace crop: its detected landmarks sit near the
    template and re-cropping it changes little."""
    hanks = load_image(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png")
    face = select_face(detect_faces(hanks, "mtcnn", min_face=30), name="Tom_Hanks_54745.png")
    assert np.abs(face.landmarks5 - align.ARCFACE_TEMPLATE).max() < 10
    again = align.arcface_crop(hanks, face.landmarks5)
    assert np.abs(again.astype(float) - hanks).mean() < 40


@needs_mtcnn  # re-detection on the crop needs real landmarks
@pytest.mark.parametrize("backend", BACKENDS)
def test_ffhq_alignment_puts_eyes_where_predicted(astronaut, backend):
    face = _detect("astronaut", astronaut, backend)[0]
    aligned = align.align_ffhq(astronaut, face.landmarks5, 256)
    assert aligned.shape == (256, 256, 3) and aligned.dtype == np.uint8
    predicted = align.apply_affine(align.ffhq_matrix(face.landmarks5, 256), face.landmarks5)
    # FFHQ geometry: eyes level, symmetric about the centre, a little above the middle
    assert abs(predicted[0, 1] - predicted[1, 1]) < 3 and abs(predicted[:2, 0].mean() - 127.5) < 3
    assert 100 < predicted[:2, 1].mean() < 128
    # re-detect on the aligned crop: the real eyes land where the transform says
    again = select_face(detect_faces(aligned, "mtcnn"), name="aligned")
    assert np.abs(again.landmarks5[:2] - predicted[:2]).max() < 8


def test_ffhq_alignment_pads_faces_at_the_border(astronaut):
    """The quad leaves the image at the top and left: FFHQ's script reflect-pads it, blurs the
    padding and fades it to the median colour with the distance from the edge."""
    lm = np.array([[20.0, 40.0], [60.0, 40.0], [40.0, 60.0], [25.0, 80.0], [55.0, 80.0]])
    out = align.align_ffhq(astronaut, lm, 128).astype(float)
    assert out.shape == (128, 128, 3)
    m = align.ffhq_matrix(lm, 128)
    inv = cv2.invertAffineTransform(m)
    yy, xx = np.mgrid[:128, :128]
    sx, sy = (inv[i, 0] * xx + inv[i, 1] * yy + inv[i, 2] for i in (0, 1))  # where each output pixel samples
    _, qsize = align.ffhq_quad(lm)
    # Well inside the image (past the band the padding's blur reaches, 0.3 * qsize / 3 = 16 px):
    # the plain warp, as OpenCV computes it, whatever the padding did to the quad's coordinates.
    inside = (sx > 20) & (sy > 20)
    plain = cv2.warpAffine(astronaut, m, (128, 128), flags=cv2.INTER_LINEAR).astype(float)
    assert inside.sum() > 5000 and np.abs(out - plain)[inside].max() <= 1.0
    # Just outside: the blurred image mirrored about the edge (OpenCV's reflect-101 border), not a fill.
    blurred = gaussian_filter(astronaut.astype(np.float32), [qsize * 0.02, qsize * 0.02, 0])
    mirrored = cv2.warpAffine(blurred, m, (128, 128), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    edge = (np.maximum(-sx, -sy) > 0) & (np.maximum(-sx, -sy) <= 3)
    assert edge.sum() > 300 and np.abs(out - mirrored)[edge].mean() < 4
    assert np.abs(out - plain)[edge].mean() > 50  # plain's black fill there is far from it
    with pytest.raises(PidrtError, match="5 finite"):
        align.align_ffhq(astronaut, lm[:4], 128)


def test_square_crop_sizes_and_edges(astronaut):
    box = np.array([181.0, 62.0, 268.0, 172.0])
    out = align.square_crop(astronaut, box, 512, margin=0.0)
    assert out.shape == (512, 512, 3)
    # the square has the box's longer side (110 px) and is centred on the box
    ref = np.asarray(Image.fromarray(astronaut[62:172, 169:279]).resize((512, 512), Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - ref).mean() < 3
    # partly outside: a 120 px square from (-30, -30), the missing rows and columns replicate the edge
    corner = align.square_crop(astronaut, [0, 0, 60, 60], 120, margin=0.5)
    replicated = cv2.copyMakeBorder(astronaut, 30, 0, 30, 0, cv2.BORDER_REPLICATE)[:120, :120]
    assert np.array_equal(corner, replicated)
    resized = align.square_crop(astronaut, [0, 0, 60, 60], 256, margin=0.5)
    ref = np.asarray(Image.fromarray(replicated).resize((256, 256), Image.Resampling.LANCZOS))
    assert resized.shape == (256, 256, 3) and np.abs(resized.astype(int) - ref).max() <= 1
    with pytest.raises(PidrtError, match="invalid face box"):
        align.square_crop(astronaut, [10, 10, 5, 5])


def test_preprocess_methods_and_background_hook(astronaut):
    backend = "haar"
    face = _detect("astronaut", astronaut, backend)[0]
    out = preprocess(astronaut, "all", face=face)
    assert out["ffhq256"].shape == (256, 256, 3)
    assert out["face512"].shape == (512, 512, 3)
    assert out["arcface112"].shape == (112, 112, 3)
    assert out["landmarks5"].shape == (5, 2) and out["box"].shape == (4,)
    assert set(preprocess(astronaut, "inv_adapter", face=face)) == {"box", "landmarks5", "face512"}

    def left_half_background(crop):  # a mask hook: left half is background
        mask = np.ones(crop.shape[:2], np.float32)
        mask[:, : crop.shape[1] // 2] = 0
        return mask

    masked = preprocess(astronaut, "pidiff", face=face, background_removal=left_half_background)["ffhq256"]
    assert (masked[:, :128] == 255).all() and np.array_equal(masked[:, 128:], out["ffhq256"][:, 128:])
    grey = preprocess(astronaut, "pidiff", face=face, background_removal=lambda c: np.full_like(c, 7))
    assert (grey["ffhq256"] == 7).all()
    with pytest.raises(PidrtError, match="background_removal returned shape"):
        preprocess(astronaut, "pidiff", face=face, background_removal=lambda c: c[:10])
    with pytest.raises(PidrtError, match="unknown preprocessing method"):
        preprocess(astronaut, "e4e", face=face)
    detected = preprocess(astronaut, "arcface", backend=backend)  # detection inside preprocess
    assert np.allclose(detected["landmarks5"], face.landmarks5)


def test_insightface_glue_with_a_stand_in_analyser(astronaut, tmp_path, monkeypatch):
    """No pack can be downloaded here, so FaceAnalysis is replaced by a stand-in that checks what
    pidrt hands it (pack folder, BGR image) and answers like insightface does."""
    from insightface import app as ins_app
    from insightface.app.common import Face as InsFace

    from pidrt.identity import faces as faces_mod

    pack = tmp_path / ".insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}

    class Recognition:
        def get_feat(self, imgs):
            seen["rec"] = imgs
            return np.full((1, 512), 2.0, np.float32)

    class StandIn:
        def __init__(self, name, allowed_modules=None, providers=None):
            seen["name"], self.models = name, {"recognition": Recognition()}

        def prepare(self, ctx_id=0, det_size=None):
            seen["ctx"] = ctx_id

        def get(self, img):
            seen["img"] = img
            lm = np.array([[205, 102], [247, 104], [225, 129], [202, 139], [245, 142]], np.float32)
            return [InsFace(bbox=np.array([181, 62, 268, 172], np.float32), kps=lm, det_score=0.93,
                            embedding=np.full(512, 3.0, np.float32))]  # fmt: skip

    monkeypatch.setattr(ins_app, "FaceAnalysis", StandIn)
    monkeypatch.setattr(faces_mod, "_FA_CACHE", {})
    assert find_model_pack() == pack
    assert faces_mod.available_backend() == "insightface"
    (face,) = detect_faces(astronaut)  # auto picks insightface once a pack is present
    assert seen["name"] == str(pack) and seen["ctx"] == -1
    assert np.array_equal(seen["img"], astronaut[:, :, ::-1])  # handed over as BGR
    assert face.detector == "insightface/buffalo_l" and face.score == pytest.approx(0.93)
    assert np.allclose(np.linalg.norm(face.extra["embedding"]), 1.0)
    crop = preprocess(astronaut, "arcface", face=face)["arcface112"]
    emb = arcface_embedding(crop)
    assert emb.shape == (512,) and np.isclose(np.linalg.norm(emb), 1.0)
    assert np.array_equal(seen["rec"], crop[:, :, ::-1])

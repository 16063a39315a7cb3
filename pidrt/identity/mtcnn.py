"""MTCNN face detector (Zhang et al. 2016) with five landmarks, in torch, on CPU.

The three cascaded networks (P-Net, R-Net, O-Net) load the converted original weights that the
``facenet-pytorch`` wheel ships as ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (MIT licence).
pidrt never imports facenet_pytorch (its import needs torchvision and pins an old torch); it
only reads those three state dicts, located with ``importlib.util.find_spec`` or given as a
folder. Install them with ``pip install --no-deps facenet-pytorch==2.6.0``.

The detection pipeline (image pyramid, proposal, refinement, output with landmarks, box
regression and non-maximum suppression) follows the paper and facenet-pytorch's inference.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from pidrt.errors import PidrtError, require

_NAMES = ("pnet", "rnet", "onet")


def find_mtcnn_weights(folder: str | os.PathLike | None = None) -> Path | None:
    """The folder holding pnet.pt, rnet.pt, onet.pt: ``folder``, $PIDRT_MTCNN_DIR, or the
    installed facenet-pytorch package's data folder. None when none has them."""
    candidates = []
    if folder is not None:
        candidates.append(Path(folder))
    if os.environ.get("PIDRT_MTCNN_DIR"):
        candidates.append(Path(os.environ["PIDRT_MTCNN_DIR"]))
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" for p in spec.submodule_search_locations]
    for c in candidates:
        if all((c / f"{n}.pt").is_file() for n in _NAMES):
            return c
    return None


def _nets():
    import torch
    from torch import nn

    def stage(spec):
        # spec: list of (name, module); returns an nn.Module whose children keep those names
        m = nn.Module()
        for name, mod in spec:
            m.add_module(name, mod)
        return m

    def pnet():
        return stage([
            ("conv1", nn.Conv2d(3, 10, 3)), ("prelu1", nn.PReLU(10)),
            ("conv2", nn.Conv2d(10, 16, 3)), ("prelu2", nn.PReLU(16)),
            ("conv3", nn.Conv2d(16, 32, 3)), ("prelu3", nn.PReLU(32)),
            ("conv4_1", nn.Conv2d(32, 2, 1)), ("conv4_2", nn.Conv2d(32, 4, 1)),
        ])  # fmt: skip

    def rnet():
        return stage([
            ("conv1", nn.Conv2d(3, 28, 3)), ("prelu1", nn.PReLU(28)),
            ("conv2", nn.Conv2d(28, 48, 3)), ("prelu2", nn.PReLU(48)),
            ("conv3", nn.Conv2d(48, 64, 2)), ("prelu3", nn.PReLU(64)),
            ("dense4", nn.Linear(576, 128)), ("prelu4", nn.PReLU(128)),
            ("dense5_1", nn.Linear(128, 2)), ("dense5_2", nn.Linear(128, 4)),
        ])  # fmt: skip

    def onet():
        return stage([
            ("conv1", nn.Conv2d(3, 32, 3)), ("prelu1", nn.PReLU(32)),
            ("conv2", nn.Conv2d(32, 64, 3)), ("prelu2", nn.PReLU(64)),
            ("conv3", nn.Conv2d(64, 64, 3)), ("prelu3", nn.PReLU(64)),
            ("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128)),
            ("dense5", nn.Linear(1152, 256)), ("prelu5", nn.PReLU(256)),
            ("dense6_1", nn.Linear(256, 2)), ("dense6_2", nn.Linear(256, 4)),
            ("dense6_3", nn.Linear(256, 10)),
        ])  # fmt: skip

    return torch, pnet(), rnet(), onet()


def _flat(x):
    # the converted Caffe weights expect a (W, H, C) flattening order
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, mode: str = "union") -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= thresh]
    return np.array(keep, dtype=np.int64)


def _square(b: np.ndarray) -> np.ndarray:
    b = b.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _regress(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = b.copy()
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b[:, :4] += reg * np.stack([w, h, w, h], axis=1)
    return b


class MTCNN:
    """Three-stage MTCNN. ``detect(img)`` -> (boxes [N, 5] x1 y1 x2 y2 score, points [N, 5, 2])."""

    def __init__(self, weights_dir=None, min_face: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        folder = find_mtcnn_weights(weights_dir)
        if folder is None:
            raise PidrtError(
                "MTCNN weights (pnet.pt, rnet.pt, onet.pt) not found: install them with "
                "'pip install --no-deps facenet-pytorch==2.6.0' or set PIDRT_MTCNN_DIR"
            )
        torch, self.pnet, self.rnet, self.onet = _nets()
        self.torch = torch
        for name, net in zip(_NAMES, (self.pnet, self.rnet, self.onet)):
            sd = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
            net.load_state_dict(sd, strict=True)
            net.eval()
        self.weights_dir = folder
        self.min_face, self.thresholds, self.factor = min_face, thresholds, factor

    def _crops(self, x, boxes: np.ndarray, size: int):
        f = self.torch.nn.functional
        h, w = x.shape[2:]
        out = []
        for b in boxes[:, :4].astype(np.int64):
            x1, y1 = min(max(int(b[0]), 1), w), min(max(int(b[1]), 1), h)
            x2, y2 = min(int(b[2]), w), min(int(b[3]), h)
            patch = x[:, :, y1 - 1 : max(y2, y1), x1 - 1 : max(x2, x1)]
            out.append(f.interpolate(patch, size=(size, size), mode="area"))
        return (self.torch.cat(out) - 127.5) * 0.0078125

    def detect(self, img: np.ndarray, min_face: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        min_face = min_face or self.min_face
        f = torch.nn.functional
        p, r, o = self.pnet, self.rnet, self.onet
        t0, t1, t2 = self.thresholds
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float()
        h, w = img.shape[:2]
        empty = (np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32))
        with torch.inference_mode():
            scale, minl, found = 12.0 / min_face, min(h, w) * 12.0 / min_face, []
            while minl >= 12:
                im = f.interpolate(x, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
                y = (im - 127.5) * 0.0078125
                y = p.prelu1(p.conv1(y))
                y = f.max_pool2d(y, 2, 2, ceil_mode=True)
                y = p.prelu3(p.conv3(p.prelu2(p.conv2(y))))
                prob = torch.softmax(p.conv4_1(y), 1)[0, 1].numpy()
                reg = p.conv4_2(y)[0].numpy()
                ys, xs = np.nonzero(prob >= t0)
                if len(ys):
                    q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / scale)
                    q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / scale)
                    cand = np.concatenate([q1, q2, prob[ys, xs][:, None], reg[:, ys, xs].T], 1)
                    found.append(cand[_nms(cand[:, :4], cand[:, 4], 0.5)])
                scale *= self.factor
                minl *= self.factor
            if not found:
                return empty
            b = np.concatenate(found)
            b = b[_nms(b[:, :4], b[:, 4], 0.7)]
            bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            b = np.concatenate([b[:, :4] + b[:, 5:9] * np.stack([bw, bh, bw, bh], 1), b[:, 4:5]], 1)
            b = _square(b)

            y = self._crops(x, b, 24)
            y = f.max_pool2d(r.prelu1(r.conv1(y)), 3, 2, ceil_mode=True)
            y = f.max_pool2d(r.prelu2(r.conv2(y)), 3, 2, ceil_mode=True)
            y = r.prelu4(r.dense4(_flat(r.prelu3(r.conv3(y)))))
            score = torch.softmax(r.dense5_1(y), 1)[:, 1].numpy()
            reg = r.dense5_2(y).numpy()
            keep = score > t1
            b = np.concatenate([b[keep, :4], score[keep, None]], 1)
            reg = reg[keep]
            k = _nms(b[:, :4], b[:, 4], 0.7)
            if len(k) == 0:
                return empty
            b = _square(_regress(b[k], reg[k]))

            y = self._crops(x, b, 48)
            y = f.max_pool2d(o.prelu1(o.conv1(y)), 3, 2, ceil_mode=True)
            y = f.max_pool2d(o.prelu2(o.conv2(y)), 3, 2, ceil_mode=True)
            y = f.max_pool2d(o.prelu3(o.conv3(y)), 2, 2, ceil_mode=True)
            y = o.prelu5(o.dense5(_flat(o.prelu4(o.conv4(y)))))
            score = torch.softmax(o.dense6_1(y), 1)[:, 1].numpy()
            reg, pts = o.dense6_2(y).numpy(), o.dense6_3(y).numpy()
        keep = score > t2
        b = np.concatenate([b[keep, :4], score[keep, None]], 1)
        reg, pts = reg[keep], pts[keep]
        bw = (b[:, 2] - b[:, 0] + 1)[:, None]
        bh = (b[:, 3] - b[:, 1] + 1)[:, None]
        points = np.stack([bw * pts[:, :5] + b[:, 0:1] - 1, bh * pts[:, 5:] + b[:, 1:2] - 1], axis=2)
        b = _regress(b, reg)
        k = _nms(b[:, :4], b[:, 4], 0.7, mode="min")
        return b[k].astype(np.float32), points[k].astype(np.float32)


_CACHE: dict[str, MTCNN] = {}


def get_mtcnn(weights_dir=None) -> MTCNN:
    """A cached MTCNN instance per weights folder."""
    require("torch", "face")
    folder = find_mtcnn_weights(weights_dir)
    key = str(folder)
    if key not in _CACHE:
        _CACHE[key] = MTCNN(folder)
    return _CACHE[key]

"""Encoder4Editing (e4e, Tov et al. 2021): FFHQ-aligned 256x256 face -> StyleGAN2 W+ code
[18, 512], PIDiff's visual prompt (methods.md section 1).

The module tree reproduces the published encoder so that the ``encoder.*`` entries of
``e4e_ffhq_encode.pt`` load by name: an IR-SE-50 backbone (``input_layer``: conv, BN, PReLU;
``body``: 24 ``bottleneck_IR_SE`` units, each with ``shortcut_layer`` (an identity max-pool or
conv + BN) and ``res_layer`` = BN, conv, PReLU, conv, BN, SE (``fc1``, ``fc2``)), then 18
gradual style blocks ``styles.K`` (stride-2 convs ``convs`` + an equalised ``linear``) reading
the 16x16 map (K < 3), the FPN 32x32 map (K < 7, ``latlayer1``) or the 64x64 map
(``latlayer2``). At inference every block is used: w = w0 repeated 18 times, plus a delta for
rows 1..17, plus ``latent_avg`` (pSp's start_from_latent_avg).

No weights can be downloaded here: ``E4EEncoder.random(seed)`` gives a seeded random encoder for
tests and demos (its codes mean nothing); real use loads the published checkpoint.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pidrt.errors import FormatError, PidrtError

_UNITS_50 = (3, 4, 14, 3)  # bottleneck units per stage of IR-50
_TAP = (6, 20, 23)  # body indices feeding the 64x64, 32x32 and 16x16 maps
COARSE, MIDDLE = 3, 7


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualLinear(nn.Module):
    """StyleGAN2's equalised linear layer (no activation): y = x (w * c)^T + b * lr_mul."""

    def __init__(self, cin: int, cout: int, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.lr_mul = lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class GradualStyleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(cout, cout, lr_mul=1)
        self.cout = cout

    def forward(self, x):
        return self.linear(self.convs(x).reshape(-1, self.cout))


def _upsample_add(x, y):
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class E4EEncoder(nn.Module):
    """The e4e encoder. ``base`` = 64 and ``n_styles`` = 18 is the published FFHQ model; a
    smaller ``base`` (>= 16; channels base..8*base, W dim 8*base) keeps every name and is
    only for fast tests. ``latent_avg`` [n_styles, dim] is a non-persistent buffer, so
    ``state_dict()`` has exactly the checkpoint's ``encoder.*`` names (without the prefix)."""

    def __init__(self, base: int = 64, n_styles: int = 18):
        super().__init__()
        if base < 16 or base % 16:
            raise PidrtError("E4EEncoder base width must be a multiple of 16")
        if n_styles < MIDDLE + 1:
            raise PidrtError(f"E4EEncoder needs at least {MIDDLE + 1} styles")
        depths = [base, 2 * base, 4 * base, 8 * base]
        dim = 8 * base
        self.input_layer = nn.Sequential(nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.PReLU(base))
        units, cin = [], base
        for depth, n in zip(depths, _UNITS_50):
            for j in range(n):
                units.append(BottleneckIRSE(cin, depth, 2 if j == 0 else 1))
                cin = depth
        self.body = nn.Sequential(*units)
        self.styles = nn.ModuleList(
            GradualStyleBlock(dim, dim, 16 if i < COARSE else 32 if i < MIDDLE else 64) for i in range(n_styles)
        )
        self.latlayer1 = nn.Conv2d(4 * base, dim, 1)
        self.latlayer2 = nn.Conv2d(2 * base, dim, 1)
        self.register_buffer("latent_avg", torch.zeros(n_styles, dim), persistent=False)
        self.base, self.n_styles, self.dim = base, n_styles, dim
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, seed: int = 0, base: int = 64, n_styles: int = 18) -> "E4EEncoder":
        """Seeded random weights (PyTorch's default init) and a seeded N(0, 1) latent_avg.
        For tests and the offline demo only: the codes carry no identity."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = cls(base, n_styles)
            enc.latent_avg.copy_(torch.randn(n_styles, enc.dim))
        return enc

    @classmethod
    def from_state_dict(cls, state: dict, latent_avg: torch.Tensor | None, source: str = "state dict") -> "E4EEncoder":
        """Build from an encoder state dict (keys without ``encoder.``) and latent_avg."""
        if "input_layer.0.weight" not in state:
            raise FormatError(f"{source}: no 'encoder.input_layer.0.weight'; not an e4e encoder")
        base = int(state["input_layer.0.weight"].shape[0])
        n_styles = len({k.split(".")[1] for k in state if k.startswith("styles.") and k.endswith(".linear.weight")})
        try:
            enc = cls(base, n_styles)
        except PidrtError as exc:
            raise FormatError(f"{source}: unsupported e4e layout ({exc})") from exc
        expected = enc.state_dict()
        missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in expected)
        bad = sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        )
        if missing or unexpected or bad:
            show = lambda xs: ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")  # noqa: E731
            parts = [f"missing keys: {show(missing)}" if missing else "",
                     f"unexpected keys: {show(unexpected)}" if unexpected else "",
                     f"shape mismatches: {show(bad)}" if bad else ""]  # fmt: skip
            raise FormatError(f"{source} does not match the e4e encoder: " + "; ".join(p for p in parts if p))
        enc.load_state_dict(state, strict=False)
        if latent_avg is None:
            raise FormatError(f"{source} has no 'latent_avg' (e4e codes are offsets from it)")
        la = torch.as_tensor(latent_avg).float()
        if la.shape in ((enc.dim,), (1, enc.dim)):
            la = la.reshape(1, enc.dim).repeat(n_styles, 1)
        if tuple(la.shape) != (n_styles, enc.dim):
            raise FormatError(f"{source}: latent_avg has shape {tuple(la.shape)}, expected ({n_styles}, {enc.dim})")
        enc.latent_avg.copy_(la)
        return enc

    @classmethod
    def from_checkpoint(cls, path: str | Path, trust_pickle: bool = False) -> "E4EEncoder":
        """Load the published ``e4e_ffhq_encode.pt`` layout ({"state_dict": {"encoder.*",
        "decoder.*"}, "latent_avg", ...}; decoder entries are ignored), a bare encoder state
        dict, or a .safetensors file with ``encoder.*`` and ``latent_avg`` tensors.

        Loads with ``weights_only=True``; a file that needs full unpickling is refused unless
        ``trust_pickle=True`` (only for files you trust: unpickling can run code)."""
        path = Path(path)
        if not path.is_file():
            raise PidrtError(f"e4e checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt: dict = {"state_dict": load_file(str(path))}
            ckpt["latent_avg"] = ckpt["state_dict"].pop("latent_avg", None)
        else:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
            except pickle.UnpicklingError as exc:
                with path.open("rb") as fh:
                    pickled = zipfile.is_zipfile(path) or fh.read(1) == b"\x80"  # torch zip or raw pickle
                if not pickled:
                    raise FormatError(f"{path} is not a torch checkpoint") from exc
                raise FormatError(
                    f"{path} holds Python objects that weights_only loading refuses; if you trust "
                    f"the file, load it with trust_pickle=True, or re-save it as "
                    f"{{'state_dict': ..., 'latent_avg': ...}} tensors ({str(exc).splitlines()[0]})"
                ) from exc
            except (RuntimeError, EOFError, OSError) as exc:
                raise FormatError(f"{path} is not a readable torch checkpoint ({exc})") from exc
        if not isinstance(ckpt, dict):
            raise FormatError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
        sd = ckpt.get("state_dict", ckpt)
        latent_avg = ckpt.get("latent_avg", sd.get("latent_avg"))
        if any(k.startswith("encoder.") for k in sd):
            sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
        else:
            sd = {k: v for k, v in sd.items() if k != "latent_avg"}
        return cls.from_state_dict(sd, latent_avg, source=str(path))

    def checkpoint_dict(self) -> dict:
        """The published file's layout: {"state_dict": {"encoder.<name>": tensor}, "latent_avg"}."""
        return {
            "state_dict": {f"encoder.{k}": v for k, v in self.state_dict().items()},
            "latent_avg": self.latent_avg.clone(),
        }

    # ------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw e4e output (without latent_avg): [B, n_styles, dim]."""
        x = self.input_layer(x)
        taps = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in _TAP:
                taps[i] = x
        c1, c2, c3 = taps[_TAP[0]], taps[_TAP[1]], taps[_TAP[2]]
        w0 = self.styles[0](c3)
        rows = [w0]
        features = c3
        for i in range(1, self.n_styles):
            if i == COARSE:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MIDDLE:
                features = _upsample_add(p2, self.latlayer2(c1))
            rows.append(w0 + self.styles[i](features))
        return torch.stack(rows, dim=1)

    @torch.inference_mode()
    def encode(self, aligned_256: torch.Tensor) -> torch.Tensor:
        """W+ codes [B, n_styles, dim] of FFHQ-aligned faces [B, 3, 256, 256] in [-1, 1]."""
        x = aligned_256
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (256, 256):
            raise PidrtError(f"e4e.encode expects [B, 3, 256, 256], got {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise PidrtError("e4e.encode expects a float tensor in [-1, 1] (see image_to_tensor)")
        if x.numel() and float(x.abs().max()) > 1.5:
            raise PidrtError("e4e.encode expects values in [-1, 1] (see image_to_tensor)")
        p = next(self.parameters())
        codes = self(x.to(device=p.device, dtype=p.dtype))
        return codes + self.latent_avg.to(codes.dtype)


def image_to_tensor(img) -> torch.Tensor:
    """RGB uint8 [256, 256, 3] (align_ffhq output) -> [1, 3, 256, 256] in [-1, 1], as e4e's
    ToTensor + Normalize(0.5, 0.5)."""
    t = torch.as_tensor(np.array(img, copy=True)) if isinstance(img, np.ndarray) else torch.as_tensor(img)
    if t.dim() != 3 or t.shape[2] != 3 or t.dtype != torch.uint8:
        raise PidrtError("image_to_tensor expects an RGB uint8 array [H, W, 3]")
    return (t.permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0)


def _code(c: torch.Tensor, what: str) -> torch.Tensor:
    c = torch.as_tensor(c)
    if c.dim() == 3 and c.shape[0] == 1:
        c = c[0]
    if c.dim() != 2:
        raise PidrtError(f"{what}: expected a W+ code [n_styles, dim], got {tuple(c.shape)}")
    return c


def mix_styles(codes: Sequence[torch.Tensor], rows: Sequence[range]) -> torch.Tensor:
    """Style mixing: row r of the result comes from ``codes[i]`` for r in ``rows[i]``.

    Rows are 0-based (PIDiff's "rows 1-9 from A, 10-18 from B" is
    ``mix_styles([a, b], [range(0, 9), range(9, 18)])``); together they must cover every row
    exactly once."""
    if len(codes) != len(rows) or not codes:
        raise PidrtError(f"mix_styles needs one row range per code ({len(codes)} codes, {len(rows)} ranges)")
    cs = [_code(c, "mix_styles") for c in codes]
    shape = cs[0].shape
    if any(c.shape != shape for c in cs):
        raise PidrtError(f"mix_styles: codes differ in shape {[tuple(c.shape) for c in cs]}")
    owner = [-1] * shape[0]
    for i, rr in enumerate(rows):
        for r in rr:
            if not 0 <= r < shape[0]:
                raise PidrtError(f"mix_styles: row {r} is outside 0..{shape[0] - 1}")
            if owner[r] != -1:
                raise PidrtError(f"mix_styles: row {r} is given by codes {owner[r]} and {i}")
            owner[r] = i
    if -1 in owner:
        raise PidrtError(f"mix_styles: rows {[r for r, o in enumerate(owner) if o == -1]} are given by no code")
    return torch.stack([cs[o][r] for r, o in enumerate(owner)])


def aggregate(codes: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Multi-reference identity: the weighted average of codes [N, n_styles, dim] with weights
    [N] (non-negative, normalised to sum 1; uniform when None) -> [n_styles, dim]."""
    codes = torch.as_tensor(codes)
    if codes.dim() != 3 or codes.shape[0] == 0:
        raise PidrtError(f"aggregate expects codes [N, n_styles, dim] with N >= 1, got {tuple(codes.shape)}")
    if weights is None:
        return codes.mean(0)
    w = torch.as_tensor(weights, dtype=codes.dtype, device=codes.device).reshape(-1)
    if w.numel() != codes.shape[0]:
        raise PidrtError(f"aggregate: {w.numel()} weights for {codes.shape[0]} codes")
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise PidrtError("aggregate: weights must be finite, non-negative and not all zero")
    return torch.einsum("n,nsd->sd", w / w.sum(), codes)

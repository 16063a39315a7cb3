"""Launcher-side checks shared by the kernel modules (no triton import here)."""

from __future__ import annotations

import math
import os

import torch

from pidrt.errors import PidrtError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = math.log2(math.e)  # the kernels exponentiate with exp2


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before triton import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise PidrtError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise PidrtError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise PidrtError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def check_device_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.device:
    """All tensors on one device the kernels can use; optionally all of one float dtype."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise PidrtError(f"all tensors must be on one device, got {listing}")
    if first.type == "cpu" and not interpreting():
        raise PidrtError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if first.type not in ("cpu", "cuda"):
        raise PidrtError(f"Triton kernels do not support device {first}")
    if first.type == "cuda" and interpreting():
        raise PidrtError("TRITON_INTERPRET=1 runs kernels on CPU tensors; move the tensors to CPU")
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise PidrtError(f"unsupported dtype {dtype}; use float16, bfloat16 or float32")
        if dtype == torch.bfloat16 and interpreting():
            raise PidrtError("the Triton interpreter has no bfloat16; use float16/float32 on CPU")
        wrong = {n: t.dtype for n, t in tensors.items() if t.dtype != dtype}
        if wrong:
            raise PidrtError(f"dtype mismatch: expected {dtype}, got {wrong}")
    return first


def batch_vector(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """A per-batch-element scalar ([B], [1], [] or a Python number) as a [B] tensor view."""
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), float(value), device=device, dtype=torch.float32)
    if value.device != device:
        raise PidrtError(f"{name} is on {value.device}, the other tensors on {device}")
    if not value.is_floating_point():
        value = value.float()
    if value.numel() == 1:
        return value.reshape(1).expand(batch)
    if value.dim() != 1 or value.shape[0] != batch:
        raise PidrtError(f"{name} must have shape [{batch}] (one value per batch element), got {tuple(value.shape)}")
    return value


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Validate a caller's output buffer, or allocate one shaped like ``like``."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    check_tensor("out", out, like.dim())
    check_shape("out", out, like.shape)
    if out.dtype != like.dtype or out.device != like.device:
        raise PidrtError(f"out must be {like.dtype} on {like.device}, got {out.dtype} on {out.device}")
    return out


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as TF32 on tensor cores (10-bit mantissa); ask for IEEE so
    # the fp32 path is an accurate check. fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"

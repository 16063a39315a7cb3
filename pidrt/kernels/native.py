"""ctypes access to the native kernel library (`pidrt_kernels`, built with CMake: docs/native.md).

The library is found at $PIDRT_NATIVE_LIB, else in the source tree's build/ folder (where
``cmake -S . -B build && cmake --build build`` puts it). `NativeKernels` lists what it holds and
launches its kernels on torch CUDA tensors on the current stream; `doctor_report` is what
``pidrt doctor`` prints about it. Nothing here imports triton: the library runs without it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pidrt.errors import PidrtError

ABI_VERSION = 1  # PIDRT_KERNELS_ABI_VERSION of csrc/include/pidrt/kernels.h
LIBRARY_NAME = "libpidrt_kernels.so"
STATUS = {0: "PIDRT_OK", 1: "PIDRT_ERR_INVALID_ARGUMENT", 2: "PIDRT_ERR_NO_KERNEL", 3: "PIDRT_ERR_NO_DRIVER",
          4: "PIDRT_ERR_CUDA"}
DTYPES = ("float32", "float16", "bfloat16")  # pidrt_dtype values 0, 1, 2

_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


class Strides2(ctypes.Structure):
    _fields_ = [("batch", _i64), ("row", _i64)]


class Strides3(ctypes.Structure):
    _fields_ = [("batch", _i64), ("row", _i64), ("head", _i64)]


class FewTokenArgs(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), *[(n, _i32) for n in ("batch", "tokens", "c_in", "c_out", "heads", "n_tokens")],
                *[(n, _ptr) for n in ("base", "x", "a", "b", "bias", "scale", "out")],
                *[(f"{n}_strides", Strides2) for n in ("base", "x", "a", "b", "out")], ("bias_batch_stride", _i64)]


class DualKvArgs(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int),
                *[(n, _i32) for n in ("batch", "tokens", "kv1_tokens", "kv2_tokens", "heads", "head_dim")],
                *[(n, _ptr) for n in ("q", "k1", "v1", "k2", "v2", "sigma", "out")],
                *[(f"{n}_strides", Strides3) for n in ("q", "k1", "v1", "k2", "v2", "out")]]


class KernelInfo(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_char_p), ("label", ctypes.c_char_p), ("arch", _i32), ("dtype", ctypes.c_int),
                ("heads_padded", _i32), ("tokens_padded", _i32), ("head_dim", _i32), ("num_warps", _i32),
                ("shared_bytes", _i32), ("cubin_bytes", ctypes.c_size_t)]


class NativeError(PidrtError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{STATUS.get(status, status)}: {message}")
        self.status = status


def library_path() -> Path | None:
    """$PIDRT_NATIVE_LIB, else <source tree>/build/libpidrt_kernels.so if it exists."""
    if os.environ.get("PIDRT_NATIVE_LIB"):
        return Path(os.environ["PIDRT_NATIVE_LIB"])
    built = Path(__file__).resolve().parents[2] / "build" / LIBRARY_NAME
    return built if built.exists() else None


class NativeKernels:
    """The loaded library. Raises PidrtError if it cannot be loaded or is of another ABI."""

    def __init__(self, path: Path | str | None = None):
        path = path or library_path()
        if path is None:
            raise PidrtError(f"the native kernel library is not built: run `cmake -S . -B build && cmake --build build` "
                             f"in the source tree, or set PIDRT_NATIVE_LIB to a {LIBRARY_NAME} (docs/native.md)")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise PidrtError(f"cannot load the native kernel library {path}: {exc}") from None
        self.path = Path(path)
        for name, restype, argtypes in (
            ("pidrt_abi_version", _i32, []), ("pidrt_build_info", ctypes.c_char_p, []),
            ("pidrt_kernel_count", _i32, []), ("pidrt_kernel_at", ctypes.POINTER(KernelInfo), [_i32]),
            ("pidrt_driver_check", ctypes.c_int, []), ("pidrt_last_error", ctypes.c_char_p, []),
            ("pidrt_few_token", ctypes.c_int, [ctypes.POINTER(FewTokenArgs), _ptr]),
            ("pidrt_dual_kv", ctypes.c_int, [ctypes.POINTER(DualKvArgs), _ptr]),
            ("pidrt_few_token_supported", ctypes.c_int, [ctypes.c_int, _i32, _i32]),
            ("pidrt_dual_kv_supported", ctypes.c_int, [ctypes.c_int, _i32]),
            ("pidrt_few_token_contiguous", None, [ctypes.POINTER(FewTokenArgs)]),
            ("pidrt_dual_kv_contiguous", None, [ctypes.POINTER(DualKvArgs)]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        if lib.pidrt_abi_version() != ABI_VERSION:
            raise PidrtError(f"{path} has C ABI {lib.pidrt_abi_version()}, this pidrt expects {ABI_VERSION}: rebuild it")
        self.lib = lib

    def build_info(self) -> str:
        return self.lib.pidrt_build_info().decode()

    def kernels(self) -> list[dict]:
        out = []
        for i in range(self.lib.pidrt_kernel_count()):
            info = self.lib.pidrt_kernel_at(i).contents
            row = {name: getattr(info, name) for name, _ in KernelInfo._fields_}
            row.update(kernel=info.kernel.decode(), label=info.label.decode(), dtype=DTYPES[info.dtype])
            out.append(row)
        return out

    def _check(self, status: int) -> None:
        if status != 0:
            raise NativeError(status, self.lib.pidrt_last_error().decode())

    def driver_check(self) -> None:
        """Raise NativeError (PIDRT_ERR_NO_DRIVER) unless the CUDA driver loads and initialises."""
        self._check(self.lib.pidrt_driver_check())

    def few_token_supported(self, dtype: str, heads: int, n_tokens: int) -> None:
        self._check(self.lib.pidrt_few_token_supported(DTYPES.index(dtype), heads, n_tokens))

    def dual_kv_supported(self, dtype: str, head_dim: int) -> None:
        self._check(self.lib.pidrt_dual_kv_supported(DTYPES.index(dtype), head_dim))

    def launch_few_token(self, args: FewTokenArgs, stream: int | None = None) -> None:
        self._check(self.lib.pidrt_few_token(ctypes.byref(args), stream))

    def launch_dual_kv(self, args: DualKvArgs, stream: int | None = None) -> None:
        self._check(self.lib.pidrt_dual_kv(ctypes.byref(args), stream))

    def few_token(self, base, x, a, b, bias, scale, n_tokens: int, out=None):
        """out = base + scale * (softmax per head(x a) b + bias) on CUDA tensors (see kernels.h for shapes).

        Any strides whose last one is 1; the current torch stream. Returns out.
        """
        import torch

        if a.dim() != 3 or a.shape[2] % n_tokens:
            raise PidrtError(f"a must be [B, C_in, heads * n_tokens] (n_tokens={n_tokens}), got {tuple(a.shape)}")
        out = torch.empty_like(base) if out is None else out
        bsz, tokens, c_out = base.shape
        args = FewTokenArgs(dtype=_dtype(base), batch=bsz, tokens=tokens, c_in=x.shape[2], c_out=c_out,
                            heads=a.shape[2] // n_tokens, n_tokens=n_tokens,
                            bias_batch_stride=_outer_strides("bias", bias, 2)[0])
        for name, t in (("base", base), ("x", x), ("a", a), ("b", b), ("out", out)):
            setattr(args, f"{name}_strides", Strides2(*_outer_strides(name, t, 3)))
        for name, t in (("base", base), ("x", x), ("a", a), ("b", b), ("bias", bias), ("scale", scale), ("out", out)):
            setattr(args, name, _pointer(name, t, base))
        self.launch_few_token(args, torch.cuda.current_stream(base.device).cuda_stream)
        return out

    def dual_kv(self, q, k1, v1, k2, v2, sigma, out=None):
        """attn(q, k1, v1) + sigma * attn(q, k2, v2) on CUDA tensors shaped [B, N, H, d] (any strides, d contiguous).

        A [B, N, H*d] tensor is passed as its .unflatten(2, (H, d)) view. Returns out.
        """
        import torch

        out = torch.empty_like(q) if out is None else out
        bsz, tokens, heads, head_dim = q.shape
        args = DualKvArgs(dtype=_dtype(q), batch=bsz, tokens=tokens, kv1_tokens=k1.shape[1], kv2_tokens=k2.shape[1],
                          heads=heads, head_dim=head_dim)
        for name, t in (("q", q), ("k1", k1), ("v1", v1), ("k2", k2), ("v2", v2), ("out", out)):
            setattr(args, f"{name}_strides", Strides3(*_outer_strides(name, t, 4)))
        for name, t in (("q", q), ("k1", k1), ("v1", v1), ("k2", k2), ("v2", v2), ("sigma", sigma), ("out", out)):
            setattr(args, name, _pointer(name, t, q))
        self.launch_dual_kv(args, torch.cuda.current_stream(q.device).cuda_stream)
        return out


def _dtype(t) -> int:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise PidrtError(f"the native kernels take {', '.join(DTYPES)} tensors, not {t.dtype}")
    return DTYPES.index(name)


def _outer_strides(name: str, t, ndim: int) -> tuple[int, ...]:
    """The strides the C API takes: all but the last, which must be 1."""
    if t.dim() != ndim or t.stride(-1) != 1:
        raise PidrtError(f"{name} must be {ndim}-D with a contiguous last dim, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return tuple(t.stride()[:-1])


def _pointer(name: str, t, like) -> int:
    if t.device != like.device or t.dtype != like.dtype or t.device.type != "cuda":
        raise PidrtError(f"{name} must be a {like.dtype} CUDA tensor on {like.device}, got {t.dtype} on {t.device}")
    if t.dim() == 1 and t.stride(0) != 1:
        raise PidrtError(f"{name} must be contiguous")
    return t.data_ptr()


def doctor_report() -> dict:
    """Whether the native library is built and loadable, what it holds, and whether it can launch here."""
    path = library_path()
    if path is None:
        return {"built": False, "how": "cmake -S . -B build && cmake --build build (docs/native.md)"}
    try:
        native = NativeKernels(path)
    except PidrtError as exc:
        return {"built": True, "path": str(path), "loadable": False, "error": str(exc)}
    rows = native.kernels()
    try:
        native.driver_check()
        driver = "ok"
    except NativeError as exc:
        driver = str(exc)
    return {"built": True, "path": str(path), "loadable": True, "build": native.build_info(),
            "kernels": len(rows), "archs": sorted({r["arch"] for r in rows}),
            "dtypes": sorted({r["dtype"] for r in rows}), "cuda_driver": driver}

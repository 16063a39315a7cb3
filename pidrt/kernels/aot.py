"""Ahead-of-time compilation of pidrt's Triton kernels for a named GPU, and their launch plans.

TensorRT's ahead-of-time plugins (``pidrt.engines.trt_plugins``) embed a kernel's PTX in the
engine and launch it with its input pointers, then int32 "extra args", then its output pointer,
so an engine runs without Python. A `Launch` is that plan for one kernel: which runtime
parameters are inputs, the int32 scalars (plain ints here, TensorRT's symbolic shape
expressions in the plugin), the grid and the compile-time constants. The same plan can

- ``compile`` for a GPU architecture with no GPU present (Triton emits PTX and cubin on the
  CPU), checking that the kernel's launch ABI is one TensorRT can reproduce, and
- ``run`` through Triton's launcher with exactly those arguments (on a GPU, or in the
  interpreter on CPU), which is how tests check the plugin's argument order, strides and
  grid against the reference without TensorRT.

A `JitCall` is one launch as pidrt's launchers make it through Triton's JIT (``TritonOps``,
the fused GroupNorm); its ``compile`` applies the specialisations the JIT makes from the
argument values, so `pidrt kernels` can compile, on a CPU, the very code a GPU will JIT.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field

import torch

from pidrt.errors import PidrtError

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
INT32_MAX = 2**31 - 1
# The first PTX ISA of each target Triton compiles for (its "a" variants from Hopper on).
OLDEST_PTX = {80: 70, 86: 71, 89: 78, 90: 80, 100: 86, 120: 87}


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one architecture: what a TensorRT AOT plugin returns and launches."""

    name: str
    ptx: str
    cubin: bytes
    arch: int  # compute capability as major*10 + minor (90 = Hopper)
    num_warps: int
    shared_bytes: int  # dynamic shared memory the launch must request

    @property
    def block_threads(self) -> int:
        return self.num_warps * 32

    @property
    def ptx_isa(self) -> str:
        """The PTX's ISA version, e.g. "9.0": what a driver loading this PTX must support."""
        return ptx_isa(self.ptx)

    def ptx_params(self) -> list[str]:
        """The PTX entry's parameter types, e.g. ['.u64 .ptr ...', '.u32'] (the launch ABI)."""
        entry = re.search(r"\.entry\s+" + re.escape(self.name) + r"\s*\((.*?)\)", self.ptx, re.DOTALL)
        if entry is None:
            raise PidrtError(f"no .entry {self.name} in the PTX")
        return [" ".join(p.split()[1:-1]) for p in entry.group(1).split(",") if p.strip()]


@dataclass(frozen=True)
class Launch:
    """How to launch `kernel` on contiguous tensors: inputs, int32 scalars, one output.

    scalars and grid hold ints or symbolic expressions (anything with + * and the `cdiv` the
    plan was built with); constexprs maps parameter names to compile-time values, including
    runtime parameters fixed for this plan (unit strides, an absent optional pointer as None).
    """

    kernel: object  # a @triton.jit function
    dtype: torch.dtype
    inputs: tuple[str, ...]
    output: str
    scalars: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    grid: tuple
    num_warps: int
    num_stages: int

    def __post_init__(self):
        names, declared = _parameters(self.kernel)
        unknown = sorted(set(self.constexprs) - set(names))
        if unknown:
            raise PidrtError(f"{self.kernel.__name__}: no parameters named {unknown}")
        missing = sorted(declared - set(self.constexprs))
        if missing:
            raise PidrtError(f"{self.kernel.__name__}: no value for constexpr parameters {missing}")
        runtime = [n for n in names if n not in self.constexprs]
        planned = [*self.inputs, *self.scalars, self.output]
        if runtime != planned:
            # TensorRT binds by position: a wrong order would read a stride as a pointer.
            raise PidrtError(f"{self.kernel.__name__}: runtime parameters are {runtime}, the plan passes {planned}")
        if not 1 <= len(self.grid) <= 3:
            raise PidrtError(f"grid must have 1 to 3 dimensions, got {self.grid}")
        for name, value in self.scalars.items():
            if isinstance(value, int) and not -INT32_MAX - 1 <= value <= INT32_MAX:
                raise PidrtError(f"{self.kernel.__name__}: scalar {name}={value} does not fit int32")

    def signature(self) -> dict[str, str]:
        ptr = "*" + TRITON_TYPES[self.dtype]
        return {n: "constexpr" if n in self.constexprs else ptr if n in self.inputs or n == self.output else "i32"
                for n in _parameters(self.kernel)[0]}

    def compile(self, arch: int, max_ptx_version: int | None = None) -> CompiledKernel:
        """Compile for sm_<arch> (e.g. 90) with Triton's bundled LLVM and ptxas; no GPU needed.

        Triton writes the PTX ISA of its bundled ptxas (9.4 for Triton 3.9's CUDA 13.4). A driver
        that loads the PTX itself, as TensorRT has it do, refuses an ISA newer than its own CUDA
        (a CUDA 13.0 driver JITs up to 9.0): pass `max_ptx_version` (e.g. `driver_ptx_version()`).
        """
        if self.dtype not in TRITON_TYPES:
            raise PidrtError(f"unsupported dtype {self.dtype}")
        if self.dtype == torch.bfloat16 and arch < 80:
            raise PidrtError(f"bfloat16 kernels need sm_80 or newer, not sm_{arch}")
        oldest = next((v for a, v in sorted(OLDEST_PTX.items(), reverse=True) if arch >= a), 0)
        if max_ptx_version is not None and max_ptx_version < oldest:
            # Checked here: below the target's first ISA, LLVM aborts the whole process.
            raise PidrtError(f"sm_{arch} needs PTX ISA {isa_text(oldest)} or newer (Triton targets "
                             f"sm_{arch}{'a' if arch >= 90 else ''}); the cap {isa_text(max_ptx_version)} is older")
        compiled = _compile(self.kernel, self.signature(), self.constexprs, (), self.num_warps, self.num_stages,
                            arch, max_ptx_version)
        _check_launch_abi(compiled.metadata)
        return _compiled_kernel(compiled, arch)

    def run(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Launch with exactly this plan's arguments (int scalars and grid) through Triton's JIT."""
        for name, value in (*self.scalars.items(), *zip("xyz", self.grid)):
            if not isinstance(value, int):
                raise PidrtError(f"run() needs concrete ints; {name} is {value!r}")
        # By name: the parameters fixed as constants sit between the runtime ones in the signature.
        args = {**{n: tensors[n] for n in self.inputs}, **self.scalars, self.output: out, **self.constexprs}
        self.kernel[self.grid](**args, num_warps=self.num_warps, num_stages=self.num_stages)
        return out


@dataclass(frozen=True)
class JitCall:
    """One launch through Triton's JIT: `kernel[grid](**args)`, every parameter by name."""

    kernel: object  # a @triton.jit function
    grid: tuple
    args: dict = field(hash=False)  # runtime and constexpr parameters alike
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)

    def specialisation(self) -> tuple[dict[str, str], dict[str, object], tuple[str, ...]]:
        """(signature, constants, names with a divisible-by-16 hint) as Triton's JIT derives them.

        The JIT (Triton 3.6 and 3.9 alike, `native_specialize_impl`) makes an int argument equal
        to 1 a constant and None a constant; an int divisible by 16 (0 included) and a pointer
        aligned to 16 bytes get ``tt.divisibility = 16``; floats are fp32 and never specialised.
        """
        names, declared = _parameters(self.kernel)
        signature, constants, divisible = {}, {}, []
        for name in names:
            value = self.args[name]
            if name in declared or value is None or (type(value) is int and value == 1):
                constants[name] = value
                signature[name] = "constexpr"
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TRITON_TYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    divisible.append(name)
            elif type(value) is int:
                signature[name] = "i32" if -INT32_MAX - 1 <= value <= INT32_MAX else "i64"
                if value % 16 == 0:
                    divisible.append(name)
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise PidrtError(f"{self.kernel.__name__}: cannot specialise {name}={value!r}")
        return signature, constants, tuple(divisible)

    def compile(self, arch: int, max_ptx_version: int | None = None) -> CompiledKernel:
        """Compile for sm_<arch> the code Triton's JIT would build for this call on such a GPU."""
        signature, constants, divisible = self.specialisation()
        return _compiled_kernel(_compile(self.kernel, signature, constants, divisible, self.num_warps,
                                         self.num_stages, arch, max_ptx_version), arch)


def _compile(kernel, signature: dict, constexprs: dict, divisible, num_warps: int, num_stages: int, arch: int,
             max_ptx_version: int | None):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(kernel, "params"):
        raise PidrtError("compiling needs the kernels imported without TRITON_INTERPRET=1 (they are "
                         "interpreter functions in this process); compile in a separate process")
    names = _parameters(kernel)[0]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    # fp fusion (FMA) on, as Triton's JIT compiles the same kernels today; explicit, so the
    # AOT code does not change when Triton flips its default.
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if max_ptx_version is not None:
        options["ptx_version"] = min(max_ptx_version, toolchain_ptx_version(arch))
    return triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _compiled_kernel(compiled, arch: int) -> CompiledKernel:
    meta = compiled.metadata
    return CompiledKernel(meta.name, compiled.asm["ptx"], compiled.asm["cubin"], arch, meta.num_warps, meta.shared)


def _parameters(kernel) -> tuple[list[str], set[str]]:
    """A @triton.jit function's parameter names, and which are declared tl.constexpr.

    Read from the Python function itself, so it works for compiled and interpreted kernels alike.
    """
    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    return list(params), {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def ptx_isa(ptx: str) -> str:
    """The ``.version`` of PTX text, e.g. "9.4"."""
    found = re.search(r"^\.version (\S+)$", ptx, re.MULTILINE)
    if found is None:
        raise PidrtError("no .version line in the PTX")
    return found.group(1)


def isa_text(version: int) -> str:
    """Triton's integer PTX version (90) as the ISA reads (9.0)."""
    return f"{version // 10}.{version % 10}"


@functools.lru_cache(maxsize=1)  # the driver does not change under a running process
def driver_ptx_version() -> int | None:
    """The newest PTX ISA the installed CUDA driver compiles (e.g. 90 for CUDA 13.0), None without one."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}")


def toolchain_ptx_version(arch: int) -> int:
    """The PTX ISA Triton writes for sm_<arch> by default: its bundled ptxas's (e.g. 94 for CUDA 13.4)."""
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    return ptx_get_version(get_ptxas(arch).version)


def _check_launch_abi(meta) -> None:
    """Refuse what a plain cuLaunchKernel of the PTX (all a TensorRT AOT plugin does) cannot do.

    Triton appends global/profile scratch pointers to every kernel; TensorRT passes null for
    arguments it was not given, which is what Triton itself passes when their size is 0.
    """
    name = meta.name
    problems = [
        f"{what} is {value}" for what, value, ok in (
            ("global_scratch_size", getattr(meta, "global_scratch_size", 0), lambda v: v == 0),
            ("profile_scratch_size", getattr(meta, "profile_scratch_size", 0), lambda v: v == 0),
            ("num_ctas", getattr(meta, "num_ctas", 1), lambda v: v == 1),
            ("launch_cooperative_grid", getattr(meta, "launch_cooperative_grid", False), lambda v: not v),
            ("launch_pdl", getattr(meta, "launch_pdl", False), lambda v: not v),
            ("tmem_size", getattr(meta, "tmem_size", 0), lambda v: v == 0),
            ("tensordesc_meta", getattr(meta, "tensordesc_meta", None), lambda v: not v),
        ) if not ok(value)
    ]
    if problems:
        raise PidrtError(f"{name}: the compiled kernel needs launch features an AOT plugin lacks: {'; '.join(problems)}")


def cdiv(a, b):
    """Ceiling division for plain ints (TensorRT plans pass ``tensorrt.plugin.cdiv`` instead)."""
    return -(-a // b)

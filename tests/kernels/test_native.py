"""The native kernel library (CMakeLists.txt, csrc/, docs/native.md).

On CPU: CMake configures and builds pidrt_kernels from the source tree into a fresh build folder
(two tiny-preset variants, fp16, sm_90: the whole build compiles with Triton on the CPU), the
library loads through ctypes, reports what it holds, refuses cleanly without a CUDA driver, and,
with a stand-in driver (fake_libcuda.c) that records instead of running, passes each kernel
exactly the arguments, grid, block and shared memory of the kernels' TensorRT launch plans. The
plugin target is skipped, with its reason, without TensorRT. On a GPU: every kernel launched
through the library equals the Triton JIT kernel and the torch reference on SD1.5 shapes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pidrt.kernels import dual_kv, few_token
from pidrt.kernels.native import DualKvArgs, FewTokenArgs, NativeError, NativeKernels

ROOT = Path(__file__).resolve().parents[2]
TINY_VARIANTS = ("few_token n=4", "dual_kv d=8")  # tiny preset: heads 8, head dims 4/8/16


def _tools() -> str | None:
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    return f"no {', '.join(missing)} on this machine (the native build needs them)" if missing else None


def _cmake(build: Path, *options: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                                *options], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    done = subprocess.run(["cmake", "--build", str(build), "--parallel"], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    return configure.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(the built library, CMake's configure output)."""
    if why := _tools():
        pytest.skip(why)
    build = tmp_path_factory.mktemp("native-build")
    log = _cmake(build, "-DPIDRT_CUDA_ARCHS=90", "-DPIDRT_KERNEL_DTYPES=float16", "-DPIDRT_KERNEL_PRESETS=tiny",
                 f"-DPIDRT_KERNEL_VARIANTS={';'.join(TINY_VARIANTS)}", "-DPIDRT_TRT_ROOT=", "-DPIDRT_TRT_INCLUDE_DIR=")
    return build / "libpidrt_kernels.so", log


@pytest.fixture
def native(built, tmp_path, monkeypatch):
    """A private copy of the library (its driver state is per process and per loaded file)."""
    copy = tmp_path / "libpidrt_kernels.so"
    shutil.copy(built[0], copy)
    monkeypatch.delenv("PIDRT_CUDA_DRIVER", raising=False)

    def load(driver: Path | None = None) -> NativeKernels:
        if driver is not None:  # read when the library first needs the driver
            monkeypatch.setenv("PIDRT_CUDA_DRIVER", str(driver))
        return NativeKernels(copy)

    return load


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fake-cuda") / "libfakecuda.so"
    done = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out), str(Path(__file__).with_name("fake_libcuda.c"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return out


class FakeLaunch(ctypes.Structure):  # fake_launch in fake_libcuda.c
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("shared", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("num_params", ctypes.c_int32), ("as_u64", ctypes.c_uint64 * 64),
                ("as_i32", ctypes.c_int32 * 64), ("function", ctypes.c_char * 128),
                ("module_bytes_seen", ctypes.c_uint64), ("shared_attribute", ctypes.c_int32),
                ("launches", ctypes.c_int32)]


def _recorded(fake: Path) -> FakeLaunch:
    lib = ctypes.CDLL(str(fake))  # the same loaded file as the library's dlopen: same record
    lib.fake_last_launch.restype = ctypes.POINTER(FakeLaunch)
    return lib.fake_last_launch().contents


# ---------------------------------------------------------------- CPU

@pytest.mark.slow
def test_cmake_builds_the_kernel_library_and_skips_the_plugins_without_tensorrt(built):
    library, log = built
    assert library.is_file()
    assert "pidrt_trt_plugins skipped: no TensorRT" in log
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in exported.splitlines() if " T " in line}
    assert "pidrt_few_token" in names and all(n.startswith("pidrt_") for n in names), names


@pytest.mark.slow
def test_library_reports_its_kernels_and_architectures(native):
    lib = native()
    import triton

    assert f"triton {triton.__version__}" in lib.build_info() and "archs 90" in lib.build_info()
    rows = {r["label"]: r for r in lib.kernels()}
    assert set(rows) == set(TINY_VARIANTS)
    assert {(r["arch"], r["dtype"]) for r in rows.values()} == {(90, "float16")}
    ft, dk = rows["few_token n=4"], rows["dual_kv d=8"]
    plan = few_token.plugin_launch(2, 64, 32, 32, 8, 4, torch.float16)
    assert (ft["kernel"], ft["heads_padded"], ft["tokens_padded"]) == ("few_token", plan.constexprs["HP"], 4)
    assert ft["num_warps"] == plan.num_warps and ft["cubin_bytes"] > 0
    plan = dual_kv.plugin_launch(2, 64, 64, 16, 8, 8, torch.float16)
    assert (dk["kernel"], dk["head_dim"], dk["num_warps"]) == ("dual_kv", 8, plan.num_warps)


def _few_token_args(bsz=2, tokens=37, c_in=48, c_out=300, heads=8, n=4, dtype=1) -> FewTokenArgs:
    args = FewTokenArgs(dtype=dtype, batch=bsz, tokens=tokens, c_in=c_in, c_out=c_out, heads=heads, n_tokens=n)
    for i, name in enumerate(("base", "x", "a", "b", "bias", "scale", "out")):
        setattr(args, name, 0x1000 * (i + 1))  # distinct fake device addresses
    return args


def _dual_kv_args(bsz=2, tokens=37, m1=37, m2=19, heads=2, d=8, dtype=1) -> DualKvArgs:
    args = DualKvArgs(dtype=dtype, batch=bsz, tokens=tokens, kv1_tokens=m1, kv2_tokens=m2, heads=heads, head_dim=d)
    for i, name in enumerate(("q", "k1", "v1", "k2", "v2", "sigma", "out")):
        setattr(args, name, 0x1000 * (i + 1))
    return args


@pytest.mark.slow
def test_refuses_cleanly_without_a_cuda_driver(native, tmp_path):
    lib = native(tmp_path / "no-such-libcuda.so.1")
    with pytest.raises(NativeError, match="no CUDA driver: cannot load .*no-such-libcuda") as err:
        lib.driver_check()
    assert err.value.status == 3
    args = _few_token_args()
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    with pytest.raises(NativeError, match="PIDRT_ERR_NO_DRIVER"):
        lib.launch_few_token(args)
    lib.few_token_supported("float16", 8, 4)  # what needs no driver still answers


@pytest.mark.slow
def test_rejects_what_it_cannot_run_before_touching_the_driver(native, tmp_path):
    lib = native(tmp_path / "no-such-libcuda.so.1")
    with pytest.raises(NativeError, match=r"PIDRT_ERR_NO_KERNEL: no few_token float16 heads=3 n_tokens=3 \(score tile 4x4\)"):
        lib.few_token_supported("float16", 3, 3)
    lib.few_token_supported("float16", 5, 3)  # pads to the built 8x4 tile
    with pytest.raises(NativeError, match="no dual_kv bfloat16 head_dim=8 .*none for this dtype"):
        lib.dual_kv_supported("bfloat16", 8)
    with pytest.raises(NativeError, match="it has: dual_kv d=8"):
        lib.dual_kv_supported("float16", 40)
    args = _few_token_args()
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    args.x = None
    with pytest.raises(NativeError, match="PIDRT_ERR_INVALID_ARGUMENT: few_token: a tensor pointer is NULL"):
        lib.launch_few_token(args)
    args = _dual_kv_args()
    lib.lib.pidrt_dual_kv_contiguous(ctypes.byref(args))
    args.k2_strides.batch = 2**31
    with pytest.raises(NativeError, match="k2 batch stride = 2147483648 does not fit int32"):
        lib.launch_dual_kv(args)


def _plan_arguments(plan, pointers: dict[str, int]) -> list[int]:
    return [pointers[n] for n in plan.inputs] + list(plan.scalars.values()) + [pointers[plan.output]]


@pytest.mark.slow
def test_launches_pass_the_tensorrt_plans_arguments(native, fake_driver):
    """Through a recording driver: the C launcher reproduces the Python plans TensorRT's AOT plugins run."""
    lib = native(fake_driver)
    rows = {r["label"]: r for r in lib.kernels()}
    args = _few_token_args()
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    lib.launch_few_token(args, stream=0xABC)
    got = _recorded(fake_driver)
    plan = few_token.plugin_launch(2, 37, 48, 300, 8, 4, torch.float16)
    pointers = dict(zip(("Base", "X", "A", "Bm", "OB", "Scale", "Out"), [0x1000 * (i + 1) for i in range(7)]))
    expected = _plan_arguments(plan, pointers)
    n_ptr = len(plan.inputs)
    assert [got.as_u64[i] for i in range(n_ptr)] == expected[:n_ptr]
    assert [got.as_i32[i] for i in range(n_ptr, len(expected) - 1)] == expected[n_ptr:-1]
    assert got.as_u64[len(expected) - 1] == expected[-1]
    # Triton's trailing scratch pointers: present and null.
    assert got.num_params > len(expected) and all(got.as_u64[i] == 0 for i in range(len(expected), got.num_params))
    assert tuple(got.grid) == plan.grid and tuple(got.block) == (plan.num_warps * 32, 1, 1)
    assert got.shared == rows["few_token n=4"]["shared_bytes"] and got.stream == 0xABC
    assert got.function == b"_few_token_kernel" and got.module_bytes_seen.to_bytes(8, "little")[:4] == b"\x7fELF"

    args = _dual_kv_args()
    lib.lib.pidrt_dual_kv_contiguous(ctypes.byref(args))
    args.k1_strides.batch = 0  # one KV set shared by the batch: a stride, not a copy
    lib.launch_dual_kv(args)
    got = _recorded(fake_driver)
    plan = dual_kv.plugin_launch(2, 37, 37, 19, 2, 8, torch.float16)
    expected = _plan_arguments(plan, dict(zip(("Q", "K1", "V1", "K2", "V2", "Sigma", "Out"),
                                              [0x1000 * (i + 1) for i in range(7)])))
    expected[len(plan.inputs) + list(plan.scalars).index("sk1b")] = 0
    n_ptr = len(plan.inputs)
    assert [got.as_u64[i] for i in range(n_ptr)] == expected[:n_ptr]
    assert [got.as_i32[i] for i in range(n_ptr, len(expected) - 1)] == expected[n_ptr:-1]
    assert tuple(got.grid) == (*plan.grid, 1) and got.block[0] == plan.num_warps * 32
    assert got.launches == 2


@pytest.mark.slow
def test_a_gpu_the_library_was_not_built_for_is_named(native, fake_driver, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_ARCH", "80")
    lib = native(fake_driver)
    args = _dual_kv_args()
    lib.lib.pidrt_dual_kv_contiguous(ctypes.byref(args))
    with pytest.raises(NativeError, match=r"PIDRT_ERR_NO_KERNEL: dual_kv d=8 is built for sm_90, not for this GPU "
                                          r"\(sm_80\): rebuild with -DPIDRT_CUDA_ARCHS=80"):
        lib.launch_dual_kv(args)
    monkeypatch.setenv("FAKE_CUDA_ARCH", "90")
    monkeypatch.setenv("FAKE_CUDA_NO_CONTEXT", "1")
    with pytest.raises(NativeError, match="PIDRT_ERR_CUDA: no CUDA context is current on this thread"):
        lib.launch_dual_kv(args)


@pytest.mark.slow
def test_plugin_sources_compile_against_tensorrt_headers(built):
    """Only where TensorRT's public headers are at hand (PIDRT_TEST_TRT_INCLUDE, e.g. the include/ folder of
    github.com/NVIDIA/TensorRT): they cannot be installed here."""
    headers = os.environ.get("PIDRT_TEST_TRT_INCLUDE")
    if not headers:
        pytest.skip("no TensorRT headers (set PIDRT_TEST_TRT_INCLUDE to a TensorRT include/ folder)")
    log = _cmake(built[0].parent, f"-DPIDRT_TRT_INCLUDE_DIR={headers}")
    assert "compile-checking the plugin sources" in log
    objects = list(built[0].parent.glob("CMakeFiles/pidrt_trt_plugins_check.dir/csrc/trt/*.o"))
    assert len(objects) == 3, objects

"""The native kernel library (CMakeLists.txt, csrc/, docs/native.md).

On CPU: CMake configures and builds pidrt_kernels from the source tree into a fresh build folder
(two tiny-preset variants in fp16 and fp32, sm_90: the build compiles with Triton on the CPU), the
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
TINY_VARIANTS = ("few_token n=16", "dual_kv d=8")  # tiny preset: heads 8, head dims 4/8/16


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
    # fp32 too: its few-token tile needs more than 48 KiB of shared memory, an opt-in at load time.
    log = _cmake(build, "-DPIDRT_CUDA_ARCHS=90", "-DPIDRT_KERNEL_DTYPES=float16;float32", "-DPIDRT_KERNEL_PRESETS=tiny",
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
    # The skip, with its reason, where TensorRT is absent (everywhere this was written).
    assert "pidrt_trt_plugins skipped: no TensorRT" in log or "pidrt: building pidrt_trt_plugins" in log
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in exported.splitlines() if " T " in line}
    assert "pidrt_few_token" in names and all(n.startswith("pidrt_") for n in names), names


@pytest.mark.slow
def test_library_reports_its_kernels_and_architectures(native):
    lib = native()
    import triton

    assert f"triton {triton.__version__}" in lib.build_info() and "archs 90" in lib.build_info()
    rows = {(r["label"], r["dtype"]): r for r in lib.kernels()}
    assert set(rows) == {(label, dtype) for label in TINY_VARIANTS for dtype in ("float16", "float32")}
    assert {r["arch"] for r in rows.values()} == {90}
    ft, dk = rows["few_token n=16", "float16"], rows["dual_kv d=8", "float16"]
    plan = few_token.plugin_launch(2, 64, 32, 32, 8, 16, torch.float16)
    assert (ft["kernel"], ft["heads_padded"], ft["tokens_padded"]) == ("few_token", plan.constexprs["HP"], 16)
    assert ft["num_warps"] == plan.num_warps and ft["cubin_bytes"] > 0
    plan = dual_kv.plugin_launch(2, 64, 64, 16, 8, 8, torch.float16)
    assert (dk["kernel"], dk["head_dim"], dk["num_warps"]) == ("dual_kv", 8, plan.num_warps)


def _few_token_args(bsz=2, tokens=37, c_in=48, c_out=300, heads=8, n=12, dtype=1) -> FewTokenArgs:
    args = FewTokenArgs(dtype=dtype, batch=bsz, tokens=tokens, c_in=c_in, c_out=c_out, heads=heads, n_tokens=n)
    for i, name in enumerate(("base", "x", "a", "b", "bias", "scale", "out")):
        setattr(args, name, 0x1000 * (i + 1))  # distinct fake device addresses
    return args


def _dual_kv_args(bsz=2, tokens=37, m1=37, m2=19, heads=2, d=8, dtype=1) -> DualKvArgs:
    args = DualKvArgs(dtype=dtype, batch=bsz, tokens=tokens, kv1_tokens=m1, kv2_tokens=m2, heads=heads, head_dim=d)
    for i, name in enumerate(("q", "k1", "v1", "k2", "v2", "sigma", "out")):
        setattr(args, name, 0x1000 * (i + 1))
    return args


def test_embed_compiles_each_distinct_variant_once():
    from pidrt.errors import PidrtError
    from pidrt.kernels.embed import plan_jobs

    jobs = plan_jobs(["sd15", "tiny"], ["float16", "bfloat16"], [80, 90])
    per_target = {(j.arch, j.dtype) for j in jobs}
    assert per_target == {(a, d) for a in (80, 90) for d in ("float16", "bfloat16")}
    # Both presets have 8 heads: their few-token tiles are the same code; head dims differ.
    labels = sorted(j.label for j in jobs if (j.arch, j.dtype) == (90, "float16"))
    assert labels == sorted([f"few_token n={n}" for n in (1, 2, 4, 8, 16)] +
                            [f"dual_kv d={d}" for d in (40, 80, 160, 4, 8, 16)])
    assert len(plan_jobs(["sd15"], ["float16"], [90], only=["dual_kv d=40"])) == 1
    with pytest.raises(PidrtError, match=r"no variants \['dual_kv d=41'\]"):
        plan_jobs(["sd15"], ["float16"], [90], only=["dual_kv d=41"])
    with pytest.raises(PidrtError, match="unknown dtype"):
        plan_jobs(["sd15"], ["float8"], [90])


def test_a_kernel_signature_the_launcher_does_not_pass_fails_the_build(tmp_path):
    """The generated source asserts the compiled parameter order; a changed kernel must not compile."""
    if why := _tools():
        pytest.skip(why)
    from pidrt.kernels.embed import cpp_source

    row = {"kind": "dual_kv", "label": "dual_kv d=8", "arch": 90, "dtype": "float16", "heads_padded": 0,
           "tokens_padded": 0, "head_dim": 8, "block_rows": 128, "block_cols": 0, "chunks_cap": 0, "num_warps": 8,
           "shared_bytes": 6144, "num_params": 32, "function": "_dual_kv_kernel", "cubin": b"\x7fELF"}
    right = dual_kv.plugin_launch(2, 37, 37, 19, 2, 8, torch.float16)
    order = [*right.inputs, *right.scalars, right.output]
    for params, compiles in ((order, True), ([*order[:7], order[8], order[7], *order[9:]], False)):
        src = tmp_path / "generated.cpp"
        src.write_text(cpp_source([{**row, "params": ",".join(params)}], "test"))
        done = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", f"-I{ROOT / 'csrc/kernels'}",
                               f"-I{ROOT / 'csrc/include'}", str(src)], capture_output=True, text=True, check=False)
        assert (done.returncode == 0) == compiles, done.stderr
        if not compiles:
            assert "the compiled kernel's parameters differ from the launcher's order" in done.stderr


def test_doctor_reports_a_library_that_does_not_load(monkeypatch, tmp_path):
    from pidrt.kernels.native import doctor_report

    monkeypatch.setenv("PIDRT_NATIVE_LIB", str(tmp_path / "libpidrt_kernels.so"))
    (tmp_path / "libpidrt_kernels.so").write_bytes(b"not a shared library")
    report = doctor_report()
    assert report["built"] and not report["loadable"] and "cannot load the native kernel library" in report["error"]


@pytest.mark.slow
def test_refuses_cleanly_without_a_cuda_driver(native, tmp_path, monkeypatch):
    lib = native(tmp_path / "no-such-libcuda.so.1")
    with pytest.raises(NativeError, match="no CUDA driver: cannot load .*no-such-libcuda") as err:
        lib.driver_check()
    assert err.value.status == 3
    args = _few_token_args()
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    with pytest.raises(NativeError, match="PIDRT_ERR_NO_DRIVER"):
        lib.launch_few_token(args)
    lib.few_token_supported("float16", 8, 16)  # what needs no driver still answers
    from pidrt.kernels.native import doctor_report

    monkeypatch.setenv("PIDRT_NATIVE_LIB", str(lib.path))
    report = doctor_report()
    assert (report["loadable"], report["kernels"], report["archs"], report["dtypes"]) == (True, 4, [90],
                                                                                      ["float16", "float32"])
    assert "PIDRT_ERR_NO_DRIVER: no CUDA driver" in report["cuda_driver"]


@pytest.mark.slow
def test_rejects_what_it_cannot_run_before_touching_the_driver(native, tmp_path):
    lib = native(tmp_path / "no-such-libcuda.so.1")
    with pytest.raises(NativeError, match=r"PIDRT_ERR_NO_KERNEL: no few_token float16 heads=3 n_tokens=3 \(score tile 4x4\)"):
        lib.few_token_supported("float16", 3, 3)
    lib.few_token_supported("float16", 5, 9)  # pads to the built 8x16 tile
    with pytest.raises(NativeError, match="no dual_kv bfloat16 head_dim=8 .*none for this dtype"):  # not built
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
    rows = {(r["label"], r["dtype"]): r for r in lib.kernels()}
    args = _few_token_args()
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    lib.launch_few_token(args, stream=0xABC)
    got = _recorded(fake_driver)
    plan = few_token.plugin_launch(2, 37, 48, 300, 8, 12, torch.float16)
    pointers = dict(zip(("Base", "X", "A", "Bm", "OB", "Scale", "Out"), [0x1000 * (i + 1) for i in range(7)]))
    expected = _plan_arguments(plan, pointers)
    n_ptr = len(plan.inputs)
    assert [got.as_u64[i] for i in range(n_ptr)] == expected[:n_ptr]
    assert [got.as_i32[i] for i in range(n_ptr, len(expected) - 1)] == expected[n_ptr:-1]
    assert got.as_u64[len(expected) - 1] == expected[-1]
    # Triton's trailing scratch pointers: present and null.
    assert got.num_params > len(expected) and all(got.as_u64[i] == 0 for i in range(len(expected), got.num_params))
    assert tuple(got.grid) == plan.grid and tuple(got.block) == (plan.num_warps * 32, 1, 1)
    assert got.shared == rows["few_token n=16", "float16"]["shared_bytes"] and got.stream == 0xABC
    assert got.shared_attribute == 0  # within the default 48 KiB: no opt-in
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

    # fp32 tiles are sized to fit the default 48 KiB too (catalog.SHARED_LIMIT); the loader opts a
    # kernel in to more only when a Triton other than the pinned one compiles it larger.
    args = _few_token_args(dtype=0)
    lib.lib.pidrt_few_token_contiguous(ctypes.byref(args))
    lib.launch_few_token(args)
    got = _recorded(fake_driver)
    assert got.shared == rows["few_token n=16", "float32"]["shared_bytes"] <= 48 * 1024
    assert got.shared_attribute == 0
    assert got.launches == 3


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


@pytest.mark.slow
def test_plugins_run_as_tensorrt_calls_them_on_a_recording_driver(built, fake_driver, tmp_path):
    """The plugin code itself, without TensorRT: trt_plugin_harness.cpp drives it through the calls TensorRT
    makes (creator from getCreators, fields as the ONNX parser passes them, build queries, configure with
    dynamic dims, enqueue) against TensorRT's public headers; the launches must be the plans'."""
    headers = os.environ.get("PIDRT_TEST_TRT_INCLUDE")
    if not headers:
        pytest.skip("no TensorRT headers (set PIDRT_TEST_TRT_INCLUDE to a TensorRT include/ folder)")
    import json

    import triton

    here = Path(__file__).parent
    cuda_include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"  # cuda_runtime_api.h
    harness = tmp_path / "harness"
    done = subprocess.run(["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-o", str(harness),
                           f"-I{ROOT / 'csrc' / 'include'}", f"-I{here}", "-isystem", headers, "-isystem", str(cuda_include),
                           str(here / "trt_plugin_harness.cpp"), str(ROOT / "csrc/trt/plugins.cpp"),
                           str(ROOT / "csrc/trt/entry_points.cpp"), str(built[0]), f"-Wl,-rpath,{built[0].parent}", "-ldl"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = subprocess.run([str(harness), str(fake_driver)], capture_output=True, text=True, check=False,
                         env={**os.environ, "PIDRT_CUDA_DRIVER": str(fake_driver)})
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    head = lines[0]
    few, dual, refused, mismatched = [line for line in lines if "name" in line]
    assert head == {"creators": 2, "kinds": ["PLUGIN CREATOR_V3ONE"] * 2, "fields": ["n_tokens", "heads"]}
    for got, name, attribute in ((few, "few_token", "n_tokens=12"), (dual, "dual_kv", "heads=2")):
        assert (got["name"], got["version"], got["namespace"], got["saved"]) == (name, "1", "pidrt", attribute)
        # float32 / float16 / bfloat16 / int32: the dtypes built (no bf16 here); one dtype for all I/O.
        assert got["supports_f32_f16_bf16_i32"] == "1100" and not got["mixed_dtypes"] and got["same_out_type"]
        assert got["configured"] == got["shape_change"] == got["enqueued"] == 0
    pointers = lambda names: dict(zip(names, [0x1000 * (i + 1) for i in range(6)] + [0x7000]))
    for got, plan, names in (
        (few, few_token.plugin_launch(2, 37, 48, 300, 8, 12, torch.float16), ("Base", "X", "A", "Bm", "OB", "Scale", "Out")),
        (dual, dual_kv.plugin_launch(2, 37, 37, 19, 2, 8, torch.float16), ("Q", "K1", "V1", "K2", "V2", "Sigma", "Out")),
    ):
        expected = _plan_arguments(plan, pointers(names))
        n_ptr = len(plan.inputs)
        params = got["params"]
        assert [p[0] for p in params[:n_ptr]] + [p[1] for p in params[n_ptr:len(expected) - 1]] == expected[:-1]
        assert params[len(expected) - 1][0] == expected[-1] and all(p == [0, 0] for p in params[len(expected):])
        assert tuple(got["grid"][:len(plan.grid)]) == plan.grid and got["block"] == plan.num_warps * 32
    assert refused["configured"] == refused["enqueued"] == 2  # PIDRT_ERR_NO_KERNEL, and the reason logged:
    assert any("no dual_kv float16 head_dim=4 kernel" in line.get("log", "") for line in lines)
    assert mismatched["configured"] == 0 and mismatched["shape_change"] == 1  # batch dims are dynamic until run
    assert any("input 2 has shape [1, 48, 96], batch differs" in line.get("log", "") for line in lines)


# ---------------------------------------------------------------- GPU: the library against the JIT kernels and torch

TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}  # vs the fp32 reference, as tests/kernels' other GPU tests


@pytest.fixture(scope="module")
def gpu_native(tmp_path_factory) -> NativeKernels:
    """The library built for this GPU with every SD1.5 variant in fp16 and bf16: $PIDRT_NATIVE_LIB or build/
    if it has them, else built here (inside gpu_session.sh's pytest stage)."""
    from pidrt.kernels.catalog import variants
    from pidrt.kernels.native import library_path
    from pidrt.models.presets import SD15

    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    wanted = {(v.label, arch, dtype) for v in variants(SD15) for dtype in ("float16", "bfloat16")}
    path = library_path()
    if path is not None and wanted <= {(r["label"], r["arch"], r["dtype"]) for r in NativeKernels(path).kernels()}:
        return NativeKernels(path)
    if why := _tools():
        pytest.skip(why)
    build = tmp_path_factory.mktemp("native-gpu-build")
    _cmake(build, f"-DPIDRT_CUDA_ARCHS={arch}", "-DPIDRT_KERNEL_DTYPES=float16;bfloat16", "-DPIDRT_KERNEL_PRESETS=sd15")
    return NativeKernels(build / "libpidrt_kernels.so")


def _same_code(native_out: torch.Tensor, jit_out: torch.Tensor) -> None:
    # The same kernel source and constants; Triton's JIT adds alignment specialisations (vector width
    # only), so the two may differ by a rounding at most.
    eps = torch.finfo(native_out.dtype).eps
    torch.testing.assert_close(native_out, jit_out, rtol=2 * eps, atol=eps)


# Every variant (the 5 few-token tiles, the 3 head dims) once, each dtype on both kernels: GPU time is scarce.
F16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,c,n,shared_identity,dtype", [
    (4096, 320, 4, False, F16), (1024, 640, 1, True, BF16), (1024, 640, 2, False, F16),
    (256, 1280, 16, False, BF16), (64, 1280, 8, True, F16)])
def test_native_few_token_equals_the_jit_kernel_and_the_reference(gpu_native, tokens, c, n, shared_identity, dtype):
    from pidrt.kernels.few_token import few_token_branch, few_token_reference
    from pidrt.models.folded import FoldedBranch

    g = torch.Generator(device="cuda").manual_seed(tokens + n)
    r = lambda *s, k=1.0: (torch.randn(*s, generator=g, device="cuda") * k).to(dtype)
    bsz, heads = 2, 8
    base, x = r(bsz, tokens, c), r(bsz, tokens, c)
    # shared_identity: one branch for the batch, passed as a stride-0 view rather than copied.
    rows = 1 if shared_identity else bsz
    a, b, bias = r(rows, c, heads * n, k=c ** -0.5), r(rows, heads * n, c), r(rows, c)
    a, b, bias = a.expand(bsz, -1, -1), b.expand(bsz, -1, -1), bias.expand(bsz, -1)
    scale = torch.tensor([0.75, 0.0], device="cuda", dtype=dtype)  # exact in both dtypes; 0 = branch off
    out = gpu_native.few_token(base, x, a, b, bias, scale, n, out=torch.full_like(base, float("nan")))
    branch = FoldedBranch(a, b, torch.zeros(bsz, heads * n, device="cuda", dtype=dtype), bias, n)
    jit = few_token_branch(base, x, branch, scale.float())
    ref = few_token_reference(base.float(), x.float(), FoldedBranch(a.float(), b.float(), branch.score_bias.float(),
                                                                    bias.float(), n), scale.float())
    torch.cuda.synchronize()
    _same_code(out, jit)
    assert (out.float() - ref).abs().max().item() <= TOL[dtype]
    assert torch.equal(out[1], base[1])  # scale 0: the base, copied


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,d,m1,m2,heads_first,dtype", [
    (4096, 40, 77, 4096, False, F16), (1024, 80, 1024, 256, True, BF16), (256, 160, 77, 512, False, F16),
    (4096, 40, 4096, 256, True, BF16)])
def test_native_dual_kv_equals_the_jit_kernel_and_the_reference(gpu_native, tokens, d, m1, m2, heads_first, dtype):
    from pidrt.kernels.dual_kv import dual_kv_attention, dual_kv_reference

    g = torch.Generator(device="cuda").manual_seed(tokens + d)
    bsz, heads = 2, 8

    def r(m):  # [B, m, H, d] views: of [B, m, H*d] (the TensorRT layout) or of [B, H, m, d] tensors
        if heads_first:
            return torch.randn(bsz, heads, m, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(bsz, m, heads * d, generator=g, device="cuda").to(dtype).unflatten(2, (heads, d))

    q, k1, v1, k2, v2 = r(tokens), r(m1), r(m1), r(m2), r(m2)
    sigma = torch.tensor([0.5, 0.0], device="cuda", dtype=dtype)
    out = gpu_native.dual_kv(q, k1, v1, k2, v2, sigma, out=torch.full_like(q, float("nan")))
    bhnd = [t.transpose(1, 2) for t in (q, k1, v1, k2, v2)]
    jit = dual_kv_attention(*bhnd, sigma.float()).transpose(1, 2)
    ref = dual_kv_reference(*[t.float() for t in bhnd], sigma.float()).transpose(1, 2)
    torch.cuda.synchronize()
    _same_code(out, jit)
    assert (out.float() - ref).abs().max().item() <= TOL[dtype]


@pytest.mark.gpu
def test_native_library_loads_and_runs_on_this_gpu(gpu_native):
    gpu_native.driver_check()
    major, minor = torch.cuda.get_device_capability()
    assert 10 * major + minor in {r["arch"] for r in gpu_native.kernels()}

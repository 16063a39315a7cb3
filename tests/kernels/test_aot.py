"""The kernels' ahead-of-time form: the TensorRT plugin launch plans and compiling for Hopper on CPU.

The plans are run here through Triton (interpreter on CPU) with exactly the arguments, order and
grid a TensorRT AOT plugin passes, on contiguous [B, N, C] tensors, and compared to the
references; what TensorRT itself adds (binding pointers by position) is then only the order,
which `Launch` checks against the kernel signature. Compiling needs the kernels imported without
the interpreter, so that part runs `pidrt kernels` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.kernels import dual_kv, few_token
from pidrt.kernels.aot import Launch, _parameters, driver_ptx_version
from pidrt.models.folded import FoldedBranch

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _few_token_case(bsz, tokens, c_in, c_out, heads, n, dtype, scale):
    g = torch.Generator().manual_seed(tokens * 7 + n)
    r = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(dtype)
    t = {"Base": r(bsz, tokens, c_out), "X": r(bsz, tokens, c_in), "A": r(bsz, c_in, heads * n, k=c_in ** -0.5),
         "Bm": r(bsz, heads * n, c_out), "OB": r(bsz, c_out), "Scale": torch.tensor(scale, dtype=dtype)}
    branch = FoldedBranch(t["A"], t["Bm"], torch.zeros(bsz, heads * n, dtype=dtype), t["OB"], n)
    ref = few_token.few_token_reference(t["Base"].float(), t["X"].float(), _float(branch), t["Scale"].float())
    return t, ref


def _float(branch: FoldedBranch) -> FoldedBranch:
    return FoldedBranch(branch.a.float(), branch.b.float(), branch.score_bias.float(), branch.out_bias.float(),
                        branch.n_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bsz,tokens,c_in,c_out,heads,n", [
    (2, 37, 48, 80, 2, 3),      # odd tokens, channels not multiples of the blocks
    (1, 64, 32, 32, 8, 4),      # the tiny preset's widest few-token layer
    (3, 5, 16, 300, 1, 16),     # one head of 16 tokens, more output chunks than one program streams
])
def test_few_token_plugin_plan_matches_reference(dtype, bsz, tokens, c_in, c_out, heads, n):
    scale = [0.7, 0.0, -1.3][:bsz]
    tensors, ref = _few_token_case(bsz, tokens, c_in, c_out, heads, n, dtype, scale)
    plan = few_token.plugin_launch(bsz, tokens, c_in, c_out, heads, n, dtype)
    out = torch.full_like(tensors["Base"], float("nan"))  # poisoned: every element must be written
    plan.run(tensors, out)
    assert torch.allclose(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    if bsz > 1:  # scale 0 is the base, bit for bit
        assert torch.equal(out[1], tensors["Base"][1])


def _split(t, heads):
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _dual_kv_case(bsz, tokens, m2, heads, d, dtype):
    g = torch.Generator().manual_seed(tokens + d)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    c = heads * d
    t = {"Q": r(bsz, tokens, c), "K1": r(bsz, tokens, c), "V1": r(bsz, tokens, c), "K2": r(bsz, m2, c),
         "V2": r(bsz, m2, c), "Sigma": torch.tensor([0.5, 0.0][:bsz], dtype=dtype)}
    f = {k: _split(v.float(), heads) for k, v in t.items() if k != "Sigma"}
    ref = dual_kv.dual_kv_reference(f["Q"], f["K1"], f["V1"], f["K2"], f["V2"], t["Sigma"].float())
    return t, ref.transpose(1, 2).reshape(bsz, tokens, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bsz,tokens,m2,heads,d", [(2, 37, 19, 2, 40), (1, 64, 16, 8, 16), (2, 9, 77, 1, 80)])
def test_dual_kv_plugin_plan_matches_reference(dtype, bsz, tokens, m2, heads, d):
    t, ref = _dual_kv_case(bsz, tokens, m2, heads, d, dtype)
    plan = dual_kv.plugin_launch(bsz, tokens, tokens, m2, heads, d, dtype)
    out = torch.full_like(t["Q"], float("nan"))
    plan.run(t, out)
    assert torch.allclose(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_plan_order_must_match_the_kernel_signature():
    plan = few_token.plugin_launch(2, 64, 32, 32, 8, 4, torch.float16)
    with pytest.raises(PidrtError, match="runtime parameters"):
        Launch(plan.kernel, plan.dtype, ("X", "Base", "A", "Bm", "OB", "Scale"), plan.output, plan.scalars,
               plan.constexprs, plan.grid, plan.num_warps, plan.num_stages)
    with pytest.raises(PidrtError, match="constexpr"):
        Launch(plan.kernel, plan.dtype, plan.inputs, plan.output, plan.scalars,
               {k: v for k, v in plan.constexprs.items() if k != "HP"}, plan.grid, plan.num_warps, plan.num_stages)


def test_plan_rejects_sizes_past_int32():
    with pytest.raises(PidrtError, match="int32"):
        few_token.plugin_launch(2, 2**22, 1280, 1280, 8, 4, torch.float16)


def test_plan_scalars_are_expressions_of_symbolic_dims():
    class Sym:  # stands in for TensorRT's ShapeExpr: only the operators the plans may use
        def __init__(self, text):
            self.text = text

        def __mul__(self, k):
            return Sym(f"({self.text}*{k})")

        __rmul__ = __mul__

    cdiv = lambda a, b: Sym(f"cdiv({a.text},{b})")
    plan = dual_kv.plugin_launch(Sym("B"), Sym("N"), Sym("N"), Sym("M"), 8, 40, torch.float16, cdiv=cdiv)
    assert plan.scalars["sqb"].text == "(N*320)" and plan.scalars["sk2b"].text == "(M*320)"
    # one program per Q tile, whatever tile dual_kv chose (the choice is documented beside it)
    assert plan.grid[0].text == f"cdiv(N,{plan.constexprs['BLOCK_M']})" and plan.grid[1].text == "(B*8)"
    assert plan.scalars["D"] == 40 and plan.scalars["sqn"] == 320


def test_a_ptx_cap_older_than_the_target_is_refused_before_llvm_aborts():
    plan = few_token.plugin_launch(2, 64, 32, 32, 8, 4, torch.float16)
    with pytest.raises(PidrtError, match=r"sm_90 needs PTX ISA 8.0 or newer .* the cap 7.8 is older"):
        plan.compile(90, max_ptx_version=78)


INTERPRETED_COMPILE = """
import torch
from pidrt.errors import PidrtError
from pidrt.kernels import few_token
try:
    few_token.plugin_launch(2, 64, 32, 32, 8, 4, torch.float16).compile(90)
except PidrtError as exc:
    print(exc)
"""


def test_compile_needs_a_non_interpreter_process():
    # A child with the interpreter on, so that this runs on a GPU machine (compiled kernels here) too.
    done = subprocess.run([sys.executable, "-c", INTERPRETED_COMPILE], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compile in a separate process" in done.stdout


def _without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # compiling must not need a GPU even where one exists
    return env


def test_every_sd15_plugin_plan_compiles_for_hopper_and_fits(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pidrt.cli", "kernels", "--preset", "sd15", "--arch", "90",
                           "--form", "plugin", "--out", str(tmp_path), "--fail-on-spill"],
                          capture_output=True, text=True, env=_without_interpreter(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["rows"]
    got = {(r["variant"], r["dtype"]) for r in rows}
    # The dtypes TensorRT may pick (fp16, and fp32 where its tile fits), every token count and head dim.
    assert got == {(f"few_token n={n}", t) for n in (1, 2, 4, 8, 16) for t in ("fp16", "fp32")} | {
        (f"dual_kv d={d}", t) for d in (40, 80) for t in ("fp16", "fp32")} | {("dual_kv d=160", "fp16")}
    # A plain launch (all an AOT plugin does) passes no dynamic shared memory opt-in: 48 KiB at most.
    assert all(r["spill_store_bytes"] == 0 and r["shared_bytes"] <= 48 * 1024 for r in rows)
    assert report["meta"]["triton"] and report["meta"]["kernel_sources"]
    assert len(list(tmp_path.glob("*.ptx"))) == len(rows) and "| dual_kv d=160 |" in (tmp_path / "report.md").read_text()


JIT_SCRIPT = """
import json, sys, torch
from pidrt.kernels.catalog import compile_variant, variants
from pidrt.models.presets import SD15
rows = []
for v in variants(SD15):
    for dtype in v.dtypes:
        if v.form == "jit" and v.kernel in ("few_token", "dual_kv") and dtype != torch.bfloat16:
            r = compile_variant(v, 90, dtype)
            rows.append({**r.to_json(), "fits": r.fits})
json.dump(rows, sys.stdout)
"""


@pytest.mark.slow
def test_sd15_jit_attention_launches_compile_for_hopper_and_fit():
    """What TritonOps has Triton's JIT compile at SD1.5 shapes (score-bias pointer, the JIT's
    stride and value specialisations), fp16 and fp32, with the Triton installed here; every
    variant and dtype under the GPU machine's Triton is in the committed report (below)."""
    done = subprocess.run([sys.executable, "-c", JIT_SCRIPT], capture_output=True, text=True,
                          env=_without_interpreter(), timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert {r["variant"].split()[0] for r in rows} == {"few_token", "dual_kv"}
    assert {r["dtype"] for r in rows} == {"fp16", "fp32"}
    assert all(r["fits"] for r in rows), [r for r in rows if not r["fits"]]


def test_jit_specialisation_is_tritons():
    """JitCall reads a launch as Triton's JIT does (ints equal to 1 and None become constants,
    multiples of 16 and 16-byte aligned pointers get divisibility hints): checked against
    Triton's own specialisation of each argument, where this Triton exposes it."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.nvidia.compiler import CUDABackend

    r = lambda *s: torch.zeros(*s, dtype=torch.float16)  # noqa: E731
    base = r(2, 40, 33)[:, :, 1:]  # odd strides, a pointer 2 bytes past an aligned one
    branch = FoldedBranch(r(2, 48, 16), r(2, 16, 32), r(2, 16), r(1, 32).expand(2, 32), 4)
    call = few_token.jit_call(base, r(2, 40, 48), branch, torch.ones(2), r(2, 40, 32), sms=132)
    signature, constants, divisible = call.specialisation()
    declared = _parameters(call.kernel)[1]
    for name, value in call.args.items():
        if name in declared:
            continue  # tl.constexpr parameters are passed as they are
        kind, key = libtriton.native_specialize_impl(CUDABackend, value, False, True, True)
        assert (signature[name], name in divisible) == (kind, key == "D"), name
        if kind == "constexpr":
            assert constants[name] == key, name
    assert "sobb" in divisible and "sobc" in constants  # the expanded out_bias: stride 0, then 1
    assert "Base" not in divisible and "X" in divisible


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GPU_TRITON = "3.6.0"  # the lent GPU machine's Triton: its JIT compiles what the report lists


def test_committed_report_covers_every_variant_under_the_gpu_machines_triton():
    from pidrt.kernels import sources_fingerprint
    from pidrt.kernels.aot import TRITON_TYPES
    from pidrt.kernels.catalog import SHARED_LIMIT, variants
    from pidrt.models.presets import SD15

    report = json.loads(sorted(RESULTS.glob("kernel-resources-sm90-triton3.6-*.json"))[-1].read_text())
    meta, rows = report["meta"], report["rows"]
    # The limits were measured with this Triton (its ptxas) on these kernel sources: a kernel edit
    # needs the report regenerated with Triton 3.6 (benchmarks/results/*.notes.md says how).
    assert meta["triton"] == GPU_TRITON and meta["arch"] == 90
    assert meta["kernel_sources"] == sources_fingerprint(), "kernel sources changed since the report was made"
    want = {(v.form, v.label, TRITON_TYPES[t]) for v in variants(SD15) for t in v.dtypes}
    assert {(r["form"], r["variant"], r["dtype"]) for r in rows} == want
    bad = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"] or r["shared_bytes"] > SHARED_LIMIT[r["form"]]]
    assert not bad, bad


ABI_SCRIPT = """
import json, sys, torch
from pidrt.kernels import dual_kv, few_token
out = []
for plan in (few_token.plugin_launch(2, 4096, 320, 320, 8, 4, torch.float16),
             dual_kv.plugin_launch(2, 4096, 77, 256, 8, 40, torch.float16)):
    k = plan.compile(90)
    out.append({"planned": [*["ptr"] * len(plan.inputs), *["i32"] * len(plan.scalars), "ptr"],
                "ptx": k.ptx_params(), "cubin": len(k.cubin), "arch": k.arch, "threads": k.block_threads,
                "warps": plan.num_warps})
json.dump(out, sys.stdout)
"""


def test_compiled_parameters_are_the_plans_then_trailing_null_scratch():
    done = subprocess.run([sys.executable, "-c", ABI_SCRIPT], capture_output=True, text=True,
                          env=_without_interpreter(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for k in json.loads(done.stdout):
        kinds = ["ptr" if ".ptr" in p else "i32" if p == ".u32" else p for p in k["ptx"]]
        # Triton appends global and profile scratch pointers; TensorRT passes null for them.
        assert kinds == k["planned"] + ["ptr", "ptr"]
        assert k["cubin"] > 0 and k["arch"] == 90 and k["threads"] == 32 * k["warps"]


PTX_SCRIPT = """
import torch
from pidrt.kernels import few_token
plan = few_token.plugin_launch(2, 64, 32, 32, 8, 4, torch.float16)
for cap in (None, 80, 10**4):
    print(plan.compile(90, max_ptx_version=cap).ptx_isa)
"""


def test_ptx_isa_can_be_capped_for_an_older_driver():
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True,
                          env=_without_interpreter(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    default, capped, uncapped = done.stdout.split()
    assert capped == "8.0" and uncapped == default  # a cap above the toolchain's own changes nothing


# ---------------------------------------------------------------- on a GPU: the compiled artifacts themselves

GPU_CASES = {  # SD1.5-like shapes, odd token counts so the masks are exercised
    "few_token": lambda: (_few_token_case(2, 300, 320, 320, 8, 4, torch.float16, [0.7, 0.0]),
                          few_token.plugin_launch(2, 300, 320, 320, 8, 4, torch.float16)),
    "dual_kv_d40": lambda: (_dual_kv_case(2, 300, 256, 8, 40, torch.float16),
                            dual_kv.plugin_launch(2, 300, 300, 256, 8, 40, torch.float16)),
    "dual_kv_d80": lambda: (_dual_kv_case(2, 200, 77, 8, 80, torch.float16),
                            dual_kv.plugin_launch(2, 200, 200, 77, 8, 80, torch.float16)),
    "dual_kv_d160": lambda: (_dual_kv_case(2, 64, 256, 8, 160, torch.float16),
                             dual_kv.plugin_launch(2, 64, 64, 256, 8, 160, torch.float16)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["ptx", "cubin"])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_compiled_kernel_runs_as_a_tensorrt_plugin_launches_it(tmp_path, case, form):
    """Load the AOT PTX (what the plugin hands TensorRT; the driver JIT-compiles it, so this also
    checks the PTX ISA cap against the driver) or the cubin, and launch it by position:
    input pointers, int32 scalars, output pointer, null scratch pointers, the planned grid, the
    compiled block size and dynamic shared memory. No Triton launcher involved."""
    cupy = pytest.importorskip("cupy", reason="cupy loads and launches the raw PTX/cubin")
    import numpy as np

    (tensors, ref), plan = GPU_CASES[case]()
    tensors = {k: v.cuda().contiguous() for k, v in tensors.items()}
    major, minor = torch.cuda.get_device_capability()
    compiled = plan.compile(10 * major + minor, max_ptx_version=driver_ptx_version())
    path = tmp_path / f"{compiled.name}.{form}"
    path.write_bytes(compiled.ptx.encode() if form == "ptx" else compiled.cubin)
    kernel = cupy.RawModule(path=str(path)).get_function(compiled.name)
    out = torch.full_like(tensors[plan.inputs[0]], float("nan"))
    args = [np.uint64(tensors[n].data_ptr()) for n in plan.inputs]
    args += [np.int32(v) for v in plan.scalars.values()] + [np.uint64(out.data_ptr())]
    params = compiled.ptx_params()
    assert all(".ptr" in p for p in params[len(args):]), params  # only scratch pointers trail
    args += [np.uint64(0)] * (len(params) - len(args))
    grid = tuple(plan.grid) + (1,) * (3 - len(plan.grid))
    torch.cuda.synchronize()
    kernel(grid, (compiled.block_threads, 1, 1), tuple(args), shared_mem=compiled.shared_bytes)
    cupy.cuda.runtime.deviceSynchronize()
    assert torch.allclose(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
    via_triton = plan.run(tensors, torch.full_like(out, float("nan")))
    # Triton's JIT specialises on pointer alignment, so the codes may differ in vector width only.
    assert torch.allclose(out, via_triton, atol=1e-3, rtol=1e-3)

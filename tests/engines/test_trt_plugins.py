"""pidrt's TensorRT AOT plugins: the glue to ``tensorrt.plugin``, and (with TensorRT) a real engine.

TensorRT cannot be installed on CPU CI. The glue is exercised against a stand-in of the
``tensorrt.plugin`` names it uses (symbolic shape expressions as strings), in a subprocess so
the kernels compile for sm_90 instead of running in the Triton interpreter. That checks the
translation from the kernels' launch plans (tested numerically in tests/kernels) to TensorRT's
launch parameters and int32 arguments; the real API is checked where TensorRT and a GPU exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
pytest.importorskip("triton")

STAND_IN = r'''
import json, sys, types

class Expr:
    """Stand-in ShapeExpr: an int when constant, else a string of the expression."""
    def __init__(self, v):
        self.v = v
    @property
    def is_constant(self):
        return isinstance(self.v, int)
    def constant_value(self):
        return self.v
    def __mul__(self, k):
        k = k.v if isinstance(k, Expr) else k
        return Expr(self.v * k if self.is_constant and isinstance(k, int) else f"({self.v}*{k})")
    __rmul__ = __mul__

class TensorDesc:
    def __init__(self, shape, dtype="HALF"):
        self.shape_expr = [Expr(s) for s in shape]
        self.dtype = dtype
    def like(self):
        return self

registry = {}
def decorator(kind):
    return lambda plugin_id: (lambda fn: registry.setdefault((kind, plugin_id), fn))

class SymIntExprs(list):
    def __init__(self, n):
        super().__init__([None] * n)

trt = types.ModuleType("tensorrt")
trt.float16, trt.float32 = "HALF", "FLOAT"
trtp = types.ModuleType("tensorrt.plugin")
trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot")
trtp.TensorDesc = TensorDesc
trtp.cdiv = lambda a, b: Expr(f"cdiv({a.v},{b})")
trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})
trtp.SymIntExprs = SymIntExprs
trtp.SymInt32 = lambda v: v
trtp.AutoTuneCombination = lambda s: s
trt.plugin = trtp
sys.modules.update({"tensorrt": trt, "tensorrt.plugin": trtp})

from pidrt.engines import trt_plugins
trt_plugins._current_arch = lambda: 90
trt_plugins.register()
trt_plugins.register()  # idempotent

def show(result):
    name, ptx, params, extra = result
    v = lambda x: x.v if isinstance(x, Expr) else x
    return {"name": name.decode(), "ptx_entry": f".entry {name.decode()}" in ptx.decode(),
            "grid": [v(params.grid_x), v(params.grid_y), v(params.grid_z)], "block": params.block_x,
            "shared": params.shared_mem, "extra": [v(e) for e in extra]}

d = lambda *s: TensorDesc(s)
out = {"registered": sorted(f"{k}:{p}" for k, p in registry),
       "types": registry[("autotune", "pidrt::few_token")](*[None] * 8),
       "few_token": show(registry[("aot", "pidrt::few_token")](
           d("B", "N", 320), d("B", "N", 320), d("B", 320, 32), d("B", 32, 320), d("B", 320), d("B"), 4, None, 0)),
       "dual_kv": show(registry[("aot", "pidrt::dual_kv")](
           d("B", "N", 640), d("B", 77, 640), d("B", 77, 640), d("B", "M", 640), d("B", "M", 640), d("B"), 8, None, 0))}
try:
    registry[("aot", "pidrt::few_token")](d("B", "N", 320), d("B", "N", "C"), d("B", 320, 32), d("B", 32, 320),
                                          d("B", 320), d("B"), 4, None, 0)
except Exception as exc:
    out["dynamic_channels"] = str(exc)
json.dump(out, sys.stdout)
'''


def test_aot_impls_translate_the_launch_plans():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", STAND_IN], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["registered"] == sorted(f"{k}:pidrt::{op}" for k in ("aot", "autotune", "register")
                                     for op in ("few_token", "dual_kv"))
    assert r["types"] == [", ".join(["FP32|FP16"] * 7)]  # six inputs and the output, all one type

    few = r["few_token"]
    assert few["name"] == "_few_token_kernel" and few["ptx_entry"] and few["block"] == 256
    assert few["grid"] == ["cdiv(N,64)", 2, "B"]  # 5 column chunks of 64, 4 per program
    # N, C_in, C_out, n_tok, H, chunks_per_prog, then the contiguous strides the plan derives.
    assert few["extra"][:6] == ["N", 320, 320, 4, 8, 4] and few["extra"][6] == "(N*320)"
    assert 0 < few["shared"] <= 48 * 1024

    dual = r["dual_kv"]
    assert dual["name"] == "_dual_kv_kernel" and dual["grid"] == ["cdiv(N,64)", "(B*8)", 1]
    assert dual["extra"][:3] == ["(N*640)", 80, 640]  # q: batch, head and token strides over [B, N, H*d]
    assert dual["extra"][-5:] == [8, "N", 77, "M", 80]  # H, N, M1, M2, D
    assert "build-time constant" in r["dynamic_channels"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT or not torch.cuda.is_available(),
                    reason="TensorRT and a CUDA GPU are needed (tensorrt cannot be installed on CPU CI)")
@pytest.mark.parametrize("method", ["sca", "eaa"])
def test_plugin_engine_matches_onnxruntime(tmp_path, method):
    from pidrt.engines.ort_backend import OrtRunner
    from pidrt.engines.trt_backend import BuildOptions, TrtRunner, build_engine
    from pidrt.export.commands import ExportOptions, _feed_for, export_models
    from pidrt.export.manifest import graph_entries, models_from_source
    from pidrt.export.specs import SpecOptions

    export_models("tiny", method, tmp_path, False, ExportOptions(kinds=("unet",), spec=SpecOptions(plugins=True)))
    entry = graph_entries(tmp_path)[f"unet_{method}_fp32_plugins"]
    engine = build_engine(entry, BuildOptions(fp16=False))
    feed, _, _ = _feed_for(models_from_source(entry.source), entry.spec, 8, 8, seed=1)
    want = OrtRunner(entry.spec, entry.path).run(feed)["noise_pred"]
    got = TrtRunner(entry.spec, engine, entry.spec.profiles).run({k: v.cuda() for k, v in feed.items()})
    assert (got["noise_pred"].cpu() - want).abs().max().item() < 1e-3

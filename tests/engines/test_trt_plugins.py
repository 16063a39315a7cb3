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

from pidrt.kernels import dual_kv, few_token

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None

STAND_IN = r'''
import inspect, json, sys, types, typing
import numpy as np

# Modelled on tensorrt.plugin's Python sources (NVIDIA/TensorRT python/packaging/bindings_wheel/
# tensorrt/plugin: _tensor.py, _validate.py, _plugin_class.py), down to what it rejects.

class SymIntExpr:
    # An int when constant, else the expression as a string. Like TensorRT's, it has no reflected
    # operators: int * expr raises TypeError, and an op on a plain SymInt32 gives an untyped SymIntExpr.
    def __init__(self, v):
        self.v = v.v if isinstance(v, SymIntExpr) else v
        if not isinstance(self.v, (int, str)):
            raise TypeError(f"not a symbolic int: {v!r}")
    def _op(self, op, other):
        o = other.v if isinstance(other, SymIntExpr) else other
        if not isinstance(o, (int, str)):
            raise TypeError(f"unsupported operand {other!r}")
        both = isinstance(self.v, int) and isinstance(o, int)
        value = {"*": lambda: self.v * o, "cdiv": lambda: -(-self.v // o)}[op]() if both else (
            f"({self.v}*{o})" if op == "*" else f"cdiv({self.v},{o})")
        return SymIntExpr(value)
    def __mul__(self, other):
        return self._op("*", other)

class SymInt32(SymIntExpr):
    pass

class ShapeExpr(SymInt32):
    def _op(self, op, other):
        return ShapeExpr(super()._op(op, other))
    @property
    def is_constant(self):
        return isinstance(self.v, int)
    def constant_value(self):
        if not self.is_constant:
            raise RuntimeError("not a constant")
        return self.v

def cdiv(first, second):
    if isinstance(first, int):
        if isinstance(second, int):
            raise ValueError("Both arguments cannot be 'int's")
        first = ShapeExpr(first)
    return first._op("cdiv", second)

class TensorDesc:
    def __init__(self, shape, dtype="HALF"):
        self.shape_expr = [ShapeExpr(s) for s in shape]
        self.shape = tuple(s if isinstance(s, int) else -1 for s in shape)  # what autotune sees: -1 dynamic
        self.dtype = dtype
    def like(self):
        return TensorDesc([e.v for e in self.shape_expr], self.dtype)

class KernelLaunchParams:
    FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0 if name == "shared_mem" else 1)
    def __setattr__(self, name, value):
        if name not in self.FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        self.__dict__[name] = SymInt32(value)  # ints and expressions alike

class SymExprs:
    def __init__(self, length):
        self.exprs = [None] * length
    def __setitem__(self, i, value):
        if i >= len(self.exprs):
            raise IndexError("Index out of range")
        if not isinstance(value, SymIntExpr):
            if not isinstance(value, int):
                raise ValueError(f"Value should be int or SymIntExpr. Got '{type(value)}'")
            value = SymIntExpr(value)  # untyped: the launch below refuses it
        self.exprs[i] = value
    def __iter__(self):
        return iter(self.exprs)
    def __len__(self):
        return len(self.exprs)

class SymIntExprs(SymExprs):
    pass

class AutoTuneCombination:
    def __init__(self, io_types, layouts="LINEAR"):
        self.io_types = [t.strip() for t in io_types.split(",")]
        self.layouts = [f.strip() for f in layouts.split(",")]

plugins = {}
SERIALIZABLE_NP = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)

def np_dtype(annotation):
    # numpy.typing.NDArray[dtype] -> dtype (tensorrt.plugin's _infer_numpy_type); None otherwise
    if typing.get_origin(annotation) is not np.ndarray:
        return None
    return typing.get_args(typing.get_args(annotation)[1])[0]

def create_plugin_attr(annotation, data):
    # tensorrt.plugin's create_plugin before 11.4: arrays through astype, scalars through the
    # annotation (int(a length-1 array): a TypeError on NumPy >= 2.4; 11.4 takes data[0])
    dtype = np_dtype(annotation)
    return data.astype(dtype) if dtype is not None else annotation(data)

def register(plugin_id):
    def decorator(fn):
        if plugin_id in plugins:
            raise ValueError(f"already has a defintion for '{plugin_id}'")
        sig = inspect.signature(fn)
        tensors, attrs = [], {}
        for name, p in sig.parameters.items():
            if p.annotation is p.empty:
                raise ValueError(f"Argument {name} does not have a type annotation")
            if issubclass(p.annotation, TensorDesc):  # a string annotation raises TypeError, as in TensorRT
                if attrs:
                    raise ValueError("TensorDescs args and attribute args cannot be interspersed")
                tensors.append(name)
            elif name in ("outputs", "stream", "tactic"):
                raise ValueError(f"'{name}' is not allowed as a plugin attribute name.")
            elif p.annotation in (int, float, bytes, bool, str) or np_dtype(p.annotation) in SERIALIZABLE_NP:
                attrs[name] = p.annotation
            else:
                raise ValueError(f"Attribute '{name}' of type {p.annotation} is not supported")
        ret = sig.return_annotation
        if not (inspect.isclass(ret) and issubclass(ret, TensorDesc)):
            raise ValueError(f"Return argument is of type {ret}")
        plugins[plugin_id] = {"register": fn, "tensors": tensors, "attrs": attrs}
        return fn
    return decorator

def _attr_names(fn, plugin, tail):
    sig = inspect.signature(fn)
    names = []
    for name, p in sig.parameters.items():
        if p.annotation is not p.empty and name != "outputs":
            if name == "tactic":
                if not issubclass(p.annotation, int):
                    raise ValueError("'tactic' input argument should be an int")
            elif not issubclass(p.annotation, TensorDesc):
                if plugin["attrs"].get(name) != p.annotation:
                    raise ValueError(f"Attribute '{name}' has a type annotation different from registration")
        if name in plugin["attrs"]:
            names.append(name)
    expected = [*plugin["tensors"], *[n for n in plugin["attrs"] if n in names], *tail]
    if list(sig.parameters) != expected:
        raise ValueError(f"signature {list(sig.parameters)} does not match the schema {expected}")
    return names

def autotune(plugin_id):
    def decorator(fn):
        plugin = plugins[plugin_id]
        plugin["autotune"], plugin["autotune_attrs"] = fn, _attr_names(fn, plugin, ["outputs"])
        return fn
    return decorator

def aot_impl(plugin_id):
    def decorator(fn):
        plugin = plugins[plugin_id]
        _attr_names(fn, plugin, ["outputs", "tactic"])
        ret = inspect.signature(fn).return_annotation
        if ret is inspect.Parameter.empty:
            raise ValueError("No return annotation found for aot_impl function")
        args = typing.get_args(ret)
        text = lambda a: all(t in (str, bytes) for t in (typing.get_args(a) or (a,)))
        if typing.get_origin(ret) is not tuple or len(args) != 4 or not (text(args[0]) and text(args[1])) \
                or not issubclass(args[2], KernelLaunchParams) or not issubclass(args[3], SymExprs):
            raise ValueError(f"Return annotation is {ret}")
        plugin["aot"] = fn
        return fn
    return decorator

def build(plugin_id, inputs, attrs):
    # What TensorRT does with one node: output descs, type/format combinations, then the AOT kernel.
    plugin = plugins[plugin_id]
    outputs = (plugin["register"](*inputs, **attrs),)
    combos = plugin["autotune"](*inputs, *[attrs[n] for n in plugin["autotune_attrs"]], outputs)
    assert all(len(c.io_types) == len(inputs) + len(outputs) for c in combos)
    # get_launch_params passes every attribute, whatever the aot_impl declared.
    name, ptx, params, extra = plugin["aot"](*inputs, *attrs.values(), outputs, 0)
    if not (isinstance(name, (str, bytes)) and isinstance(ptx, (str, bytes))):
        raise TypeError("Kernel name and PTX must be 'str' or 'bytes'")
    if not isinstance(params, KernelLaunchParams) or not isinstance(extra, SymExprs):
        raise TypeError("expected KernelLaunchParams and SymIntExprs")
    if not all(isinstance(e, SymInt32) for e in extra):
        raise TypeError("Extra args must be a 'tensorrt.plugin.SymInt32'")
    name, ptx = (s.decode() if isinstance(s, bytes) else s for s in (name, ptx))
    return {"types": [", ".join(c.io_types) for c in combos], "name": name,
            "ptx_entry": f".entry {name}" in ptx, "ptx_isa": aot.ptx_isa(ptx),
            "grid": [params.grid_x.v, params.grid_y.v, params.grid_z.v], "block": params.block_x.v,
            "shared": params.shared_mem.v, "extra": [e.v for e in extra]}

trt = types.ModuleType("tensorrt")
trt.float16, trt.float32 = "HALF", "FLOAT"
trtp = types.ModuleType("tensorrt.plugin")
for obj in (register, autotune, aot_impl, cdiv, TensorDesc, KernelLaunchParams, SymExprs, SymIntExprs, SymInt32,
            ShapeExpr, AutoTuneCombination):
    setattr(trtp, obj.__name__, obj)
trt.plugin = trtp
sys.modules.update({"tensorrt": trt, "tensorrt.plugin": trtp})

from pidrt.engines import trt_plugins
from pidrt.kernels import aot
trt_plugins._current_arch = lambda: 90
aot.driver_ptx_version = lambda: 84  # a CUDA 12.4 driver: older than Triton's ptxas
trt_plugins.register()
trt_plugins.register()  # idempotent (TensorRT refuses a second definition)

def parse(node):
    # onnx-tensorrt's FallbackPluginImporter: the creator is looked up by exactly (op_type,
    # plugin_version or "1", plugin_namespace or ""); the node's domain plays no part. A field is
    # made for each attribute the creator registered (an ONNX INT as a length-1 int32 array),
    # others are dropped; aot != 0 asks for the AOT implementation. tensorrt.plugin's
    # create_plugin then converts each field with its annotation.
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    namespace = attrs.get("plugin_namespace", b"").decode()
    assert attrs.get("plugin_version", b"1").decode() == "1"  # tensorrt.plugin registers version "1"
    plugin_id = f"{namespace}::{node.op_type}"
    if plugin_id not in plugins:
        raise KeyError(f"no plugin creator {node.op_type} version 1 in namespace {namespace!r}")
    plugin = plugins[plugin_id]
    fields = {n: np.array([attrs[n]], dtype=np.int32) for n in plugin["attrs"] if n in attrs}
    converted = {n: create_plugin_attr(plugin["attrs"][n], v) for n, v in fields.items()}
    return plugin_id, converted, attrs.get("aot", 0) != 0

import onnx
nodes = {n.op_type: parse(n) for n in onnx.load(sys.argv[1]).graph.node if n.op_type in ("few_token", "dual_kv")}
d = lambda *s: TensorDesc(s)
as_json = lambda attrs: {n: [v.tolist(), str(v.dtype)] for n, v in attrs.items()}  # noqa: E731
out = {"registered": sorted(plugins), "parsed": {k: [v[0], as_json(v[1]), v[2]] for k, v in nodes.items()},
       "few_token": build(nodes["few_token"][0], [d("B", "N", 320), d("B", "N", 320), d("B", 320, 32),
                                                  d("B", 32, 320), d("B", 320), d("B")], nodes["few_token"][1]),
       "dual_kv": build(nodes["dual_kv"][0], [d("B", "N", 640), d("B", 77, 640), d("B", 77, 640), d("B", "M", 640),
                                              d("B", "M", 640), d("B")], nodes["dual_kv"][1])}
# Head dim 160: no fp32 tile of dual_kv fits 48 KiB of shared memory, so fp16 only.
wide = [d("B", "N", 1280), d("B", 77, 1280), d("B", 77, 1280), d("B", "M", 1280), d("B", "M", 1280), d("B")]
out["dual_kv_d160_types"] = [", ".join(c.io_types) for c in plugins["pidrt::dual_kv"]["autotune"](
    *wide, nodes["dual_kv"][1]["heads"], None)]
try:
    build("pidrt::few_token", [d("B", "N", 320), d("B", "N", "C"), d("B", 320, 32), d("B", 32, 320), d("B", 320),
                               d("B")], nodes["few_token"][1])
except Exception as exc:
    out["dynamic_channels"] = str(exc)
json.dump(out, sys.stdout)
'''


def _plugin_nodes_graph(path) -> str:
    """One few_token (n_tokens 4) and one dual_kv (heads 8) node, written by pidrt's exporter symbolics."""
    import warnings

    from pidrt.export.plugin_nodes import _DualKV, _FewToken

    class Nodes(torch.nn.Module):
        def forward(self, base, x, a, b, bias, scale, q, k, v, k2, v2, sigma):
            return _FewToken.apply(base, x, a, b, bias, scale, 4), _DualKV.apply(q, k, v, k2, v2, sigma, 8)

    r = torch.randn
    inputs = (r(1, 3, 16), r(1, 3, 16), r(1, 16, 32), r(1, 32, 16), r(1, 16), r(1),
              r(1, 3, 16), r(1, 5, 16), r(1, 5, 16), r(1, 2, 16), r(1, 2, 16), r(1))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices, as in pidrt's exporter
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(Nodes(), inputs, str(path), opset_version=18, dynamo=False)
    return str(path)


def test_aot_impls_translate_the_launch_plans(tmp_path):
    graph = _plugin_nodes_graph(tmp_path / "nodes.onnx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", STAND_IN, graph], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["registered"] == ["pidrt::dual_kv", "pidrt::few_token"]
    # The exported nodes resolve to the registered plugins as TensorRT's parser resolves them, with
    # their attributes (and only those) as ints, and ask for the AOT implementation.
    assert r["parsed"] == {"few_token": ["pidrt::few_token", {"n_tokens": [[4], "int32"]}, True],
                           "dual_kv": ["pidrt::dual_kv", {"heads": [[8], "int32"]}, True]}

    # The tiles are the kernels' choice (documented beside it): what is checked here is that the
    # TensorRT launch carries the plan's, whatever they are.
    few_plan = few_token.plugin_launch(2, 300, 320, 320, 8, 4, torch.float16)
    dual_plan = dual_kv.plugin_launch(2, 300, 77, 300, 8, 80, torch.float16)
    few = r["few_token"]
    assert few["types"] == [", ".join(["FP32|FP16"] * 7)]  # six inputs and the output, all one type
    assert few["ptx_isa"] == r["dual_kv"]["ptx_isa"] == "8.4"  # held to the driver's PTX ISA
    assert few["name"] == "_few_token_kernel" and few["ptx_entry"] and few["block"] == 32 * few_plan.num_warps
    assert few["grid"] == [f"cdiv(N,{few_plan.constexprs['BLOCK_N']})", few_plan.grid[1], "B"]
    # N, C_in, C_out, n_tok, H, chunks_per_prog, then the contiguous strides the plan derives.
    assert few["extra"][:6] == ["N", 320, 320, 4, 8, few_plan.scalars["chunks_per_prog"]]
    assert few["extra"][6] == "(N*320)" and 0 < few["shared"] <= 48 * 1024

    dual = r["dual_kv"]
    assert dual["name"] == "_dual_kv_kernel" and dual["block"] == 32 * dual_plan.num_warps
    assert dual["grid"] == [f"cdiv(N,{dual_plan.constexprs['BLOCK_M']})", "(B*8)", 1]
    assert dual["extra"][:3] == ["(N*640)", 80, 640]  # q: batch, head and token strides over [B, N, H*d]
    assert dual["extra"][-5:] == [8, "N", 77, "M", 80]  # H, N, M1, M2, D
    assert "build-time constant" in r["dynamic_channels"]
    assert dual["types"] == [", ".join(["FP32|FP16"] * 7)] and r["dual_kv_d160_types"] == [", ".join(["FP16"] * 7)]


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

"""Trace one wrapper module to ONNX, clean the graph, save it atomically, check it.

Steps: `torch.onnx.export` (TorchScript exporter, opset 18) into a scratch folder; polygraphy's
constant folding; dropping the Adds of all-zero constants the wrappers leave (the absent score
bias); shape inference; save (external data once over 2 GB, as protobuf cannot hold more);
`onnx.checker`; the TensorRT op-support check. The result's key (`graph_key`) is what the
manifest compares to skip a re-export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pidrt.errors import PidrtError, require
from pidrt.export.inputs import example_feed
from pidrt.export.specs import ModelSpec
from pidrt.fileio import atomic_write

EXPORT_FORMAT = 1  # bump when the wrappers or the cleanup change what a graph computes
# Protobuf's hard limit is 2 GiB; leave room for the graph itself next to the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000
FOLD_PASSES = 2


def graph_key(weights_fingerprint: str, spec: ModelSpec) -> str:
    """What a cached graph must match: the weights, the spec (dtype, opset, profiles included)."""
    record = {"format": EXPORT_FORMAT, "weights": weights_fingerprint, "spec": spec.to_json()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ExportResult:
    path: Path
    data_path: Path | None  # external data file, when the graph is over 2 GB
    bytes: int
    ops: tuple[str, ...]
    trt_problems: tuple[str, ...]
    seconds: float


@contextlib.contextmanager
def _one_thread():
    # Tracing runs the model once at the profile's smallest shape, op by op; with several
    # intra-op threads on a busy machine the pool's spin-waits cost more than the math
    # (tiny UNet forward on 2 shared cores: 1.85 s with 2 threads, 0.08 s with 1).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _tensor_bytes(t) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    count = 1
    for d in t.dims:
        count *= d
    return count * tensor_dtype_to_np_dtype(t.data_type).itemsize


def _initializer_bytes(model) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _load_external(model, base: Path, max_bytes: int | None = None, only=None) -> None:
    """Read external-data initializers (up to `max_bytes` each, or just `only`) into the model."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in [only] if only is not None else model.graph.initializer:
        if uses_external_data(t) and (max_bytes is None or _tensor_bytes(t) <= max_bytes):
            load_external_data_for_tensor(t, str(base))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def drop_zero_adds(model):
    """Remove `x + 0` where 0 is an all-zero constant that cannot change x's shape."""
    gs = require("onnx_graphsurgeon", "onnx")
    graph = gs.import_onnx(model)
    outputs = set(map(id, graph.outputs))
    dropped = 0
    for node in graph.nodes:
        if node.op != "Add" or id(node.outputs[0]) in outputs:
            continue
        for j in (0, 1):
            const, other = node.inputs[j], node.inputs[1 - j]
            # Shapes first: reading `values` of a big weight would load it from external data.
            if not isinstance(const, gs.Constant) or other.shape is None:
                continue
            if any(d != 1 for d in const.shape) or len(const.shape) > len(other.shape) or const.values.any():
                continue
            out = node.outputs[0]
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = other
            node.outputs.clear()
            dropped += 1
            break
    if not dropped:
        return model
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def cleanup(model):
    """Fold constants, drop zero adds, infer shapes (polygraphy; onnx-graphsurgeon underneath)."""
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    with contextlib.suppress(ImportError):
        import onnxruntime  # folding evaluates subgraphs with it; its optimiser warns per node

        onnxruntime.set_default_logger_severity(3)
    # Pass 1 folds the weight-only subgraphs, pass 2 the shape arithmetic that shape inference
    # resolved after pass 1 (tiny UNet: 6474 -> 4408 -> 3477 nodes); a third pass folds nothing
    # on SD graphs and would cost as much as the export, so FOLD_PASSES stops at 2.
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # per-pass progress lines are noise here
        model = fold_constants(model, num_passes=FOLD_PASSES, do_shape_inference=True, size_threshold=None,
                               allow_onnxruntime_shape_inference=False)
        model = drop_zero_adds(model)
        return infer_shapes(model, allow_onnxruntime=False)


def _tensor_data(t, base: Path) -> bytes:
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(t):
        return t.raw_data or numpy_helper.to_array(t).tobytes()
    info = {e.key: e.value for e in t.external_data}
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]) if "length" in info else -1)


def save_model(model, path: Path, key: str, base: Path) -> Path | None:
    """Write `model` at `path` atomically; over 2 GB its weights go to `<stem>.<key8>.onnx.data`.

    Initializers may still be external files under `base` (the exporter's scratch folder): they
    are streamed into the one data file, never all held in memory. The data file name carries
    the key, so a reader holding the previous .onnx still finds the previous data file; the
    caller removes stale data files once the manifest points at the new one.
    """
    from onnx import TensorProto

    path = Path(path)
    if _initializer_bytes(model) <= EXTERNAL_DATA_BYTES:
        _load_external(model, base)
        atomic_write(path, model.SerializeToString())
        return None
    data = path.with_name(f"{path.stem}.{key[:8]}.onnx.data")
    fd, tmp = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for t in model.graph.initializer:
                if _tensor_bytes(t) < 1024:
                    _load_external(model, base, only=t)
                    continue
                raw = _tensor_data(t, base)
                f.write(b"\0" * (-f.tell() % 4096))  # page-aligned: TensorRT / ORT may mmap
                offset = f.tell()
                f.write(raw)
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(field)
                del t.external_data[:]
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write(path, model.SerializeToString())
    return data


def export_graph(module: torch.nn.Module, spec: ModelSpec, path: Path, key: str) -> ExportResult:
    """Export `module` (a wrapper from `graph_module`) to `path` and check the result."""
    onnx = require("onnx", "onnx")
    require("onnx_graphsurgeon", "onnx")
    from pidrt.export.trt_supported_ops import check_graph

    clock = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2, not 1: a traced size-1 axis can be mistaken for a broadcast and baked in.
    profile = spec.profiles[0]
    device = next(module.parameters()).device
    feed = example_feed(spec, max(2, profile.batch[0]), profile.height[0], profile.width[0], device=device)
    args = tuple(feed[n] for n in spec.input_names)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.trace.", dir=path.parent))
    try:
        with _one_thread(), torch.no_grad(), _quiet():
            torch.onnx.export(
                module, args, str(scratch / "graph.onnx"), input_names=spec.input_names,
                output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), opset_version=spec.opset,
                do_constant_folding=True, dynamo=False,
            )
        # Over 2 GB the exporter writes one file per weight next to the graph. The cleanup runs
        # on the graph with the big weights left on disk (each pass copies the model; with 3.4 GB
        # of weights in memory that peaked at 19 GB), and they are read back only to save.
        model = onnx.load(str(scratch / "graph.onnx"), load_external_data=False)
        _load_external(model, scratch, max_bytes=1 << 20)
        model = cleanup(model)
        model.doc_string = f"pidrt {spec.name} key={key}"
        problems = tuple(check_graph(model))
        ops = tuple(sorted({n.op_type for n in model.graph.node}))
        data = save_model(model, path, key, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del model
    try:
        onnx.checker.check_model(str(path))  # the path form works past 2 GB
    except onnx.checker.ValidationError as exc:
        raise PidrtError(f"{path}: the exported graph fails onnx.checker: {exc}") from exc
    size = path.stat().st_size + (data.stat().st_size if data else 0)
    return ExportResult(path, data, size, ops, problems, time.perf_counter() - clock)


@contextlib.contextmanager
def _quiet():
    # The TorchScript exporter warns on every traced Python branch of diffusers (asserts on
    # shapes, upsample size checks); they are expected for a fixed-structure UNet.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        yield

"""Which ONNX ops TensorRT's ONNX parser accepts, as data, and a static check of a graph against it.

Source: onnx/onnx-tensorrt `docs/operators.md`, "TensorRT 10.15 supports operators in the
inclusive range of opset 9 to opset 24" (the 10.15 GA support matrix). Only the rows marked
"Y" are in SUPPORTED, with the "Supported Types" column; rows marked "N" are in UNSUPPORTED so
a failure can say "not supported" rather than "unknown". The check runs without TensorRT, so
CPU CI catches an exporter change that would break `pidrt build` on the GPU machines.
Update the table (and SOURCE) when moving to a newer TensorRT.
"""

from __future__ import annotations

import onnx

from pidrt.export.plugin_nodes import NAMESPACE as PLUGIN_NAMESPACE
from pidrt.export.plugin_nodes import OPS as PLUGIN_OPS

SOURCE = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.15 GA, opset 9-24)"
OPSET_RANGE = (9, 24)

_F = "FP32 FP16 BF16"
_FI = _F + " INT32 INT64"
_FIB = _FI + " BOOL"
_Q = "INT8 FP8 FP4 INT4"

SUPPORTED: dict[str, str] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI, "ArgMin": _FI,
    "Asin": _F, "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": _F + " INT8 FP8", "AveragePool": _F,
    "BatchNormalization": _F, "BlackmanWindow": "FP32 FP16", "Cast": _FIB + " UINT8", "CastLike": _FIB + " UINT8",
    "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB, "Constant": _FIB + " " + _Q,
    "ConstantOfShape": _FIB + " " + _Q, "Conv": _F, "ConvTranspose": _F, "Cos": _F, "Cosh": _F, "CumSum": _F,
    "DeformConv": "FP32 FP16", "DepthToSpace": _FI, "DequantizeLinear": _Q, "Div": _FI, "Dropout": _F,
    "Einsum": _F, "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB,
    "Flatten": _FIB, "Floor": _F, "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB,
    "Gelu": _FI + " INT8", "Gemm": _F, "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F,
    "Greater": _FI, "GreaterOrEqual": _FI, "GridSample": "FP32 FP16", "GroupNormalization": _F, "GRU": _F,
    "HammingWindow": "FP32 FP16", "HannWindow": "FP32 FP16", "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F,
    "Identity": _FIB, "If": _FIB, "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI,
    "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F,
    "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F, "LpPool": _F, "MatMul": _F, "Max": _FI,
    "MaxPool": _F, "Mean": _FI + " FP8", "MeanVarianceNormalization": _F, "Min": _FI, "Mish": "FP32 FP16",
    "Mod": _FI, "Mul": _FI, "Neg": _FI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16", "Not": "BOOL",
    "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI, "PRelu": _F,
    "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI,
    "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _FIB, "Resize": _F,
    "ReverseSequence": _FIB, "RMSNormalization": _F, "RNN": _F, "RoiAlign": "FP32 FP16", "RotaryEmbedding": _F,
    "Round": _F, "STFT": "FP32", "ScaledTanh": _F, "Scan": _F, "Scatter": _FI, "ScatterElements": _FI,
    "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F, "Sign": _FI, "Sin": _F,
    "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F, "Softsign": _F,
    "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI, "Tan": _F,
    "Tanh": _F, "TensorScatter": _F + " INT32", "ThresholdedRelu": _F, "Tile": _FIB, "TopK": _FI,
    "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F, "Where": _FIB, "Xor": "BOOL",
}

UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

# Restrictions column of Resize, the one restricted op SD graphs use (UNet upsampling).
RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}

_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.DOUBLE: "DOUBLE",
}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_graph(model: onnx.ModelProto) -> list[str]:
    """Problems TensorRT's parser would report, one line each ([] = the graph should parse).

    Checks op support, the type of each node's first input where shape inference knows it,
    the default-domain opset range, and Resize's modes.
    """
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            problems.append(f"opset {imp.version} outside TensorRT's range {OPSET_RANGE}")
    types = _elem_types(model)
    seen: set[tuple[str, str]] = set()
    for node in model.graph.node:
        op = node.op_type
        if node.domain == PLUGIN_NAMESPACE and op in PLUGIN_OPS:
            continue  # pidrt's own plugins: pidrt.engines.trt_plugins registers them before a build
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{op} (domain {node.domain}): custom-domain op, needs a plugin")
            continue
        if op not in SUPPORTED:
            why = "not supported" if op in UNSUPPORTED else "not in the support matrix"
            key = (op, why)
            if key not in seen:
                seen.add(key)
                problems.append(f"{op}: {why} by TensorRT's ONNX parser")
            continue
        if node.input and node.input[0] in types:
            t = _TYPE_NAMES.get(types[node.input[0]], onnx.TensorProto.DataType.Name(types[node.input[0]]))
            if t not in SUPPORTED[op].split() and (op, t) not in seen:
                seen.add((op, t))
                problems.append(f"{op}: input type {t} not supported (supports {SUPPORTED[op]})")
        if op == "Resize":
            mode = _attr(node, "mode", b"nearest").decode()
            tr = _attr(node, "coordinate_transformation_mode", b"half_pixel").decode()
            nearest = _attr(node, "nearest_mode", b"round_prefer_floor").decode()
            if mode not in RESIZE_MODES or tr not in RESIZE_TRANSFORMS or (mode == "nearest" and nearest not in RESIZE_NEAREST):
                problems.append(f"Resize {node.name}: mode={mode}, transform={tr}, nearest={nearest} not supported")
            if _attr(node, "antialias", 0):
                problems.append(f"Resize {node.name}: antialiasing is not supported")
    return problems

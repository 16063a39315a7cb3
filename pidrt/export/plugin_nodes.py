"""TensorRT plugin nodes in exported graphs: the identity branches as one custom node per layer call.

With ``SpecOptions(plugins=True)`` (``pidrt export --trt-plugins``) the UNet graph carries, instead
of the plain-op subgraph of each branch, a node TensorRT's ONNX parser maps to pidrt's
ahead-of-time plugins (``pidrt.engines.trt_plugins``): op_type = plugin name, a
``plugin_namespace`` attribute (the parser's lookup key with the name and version, matched
exactly; the node's ``pidrt`` domain, which ONNX needs for a custom op, plays no part in it), and
``aot = 1`` so the parser takes the compiled-kernel implementation and the engine
runs without Python. The default export keeps plain ops.

The node contracts (inputs in order, one output, all of the graph's float dtype):

``pidrt::few_token``  base [B, N, C_out], x [B, N, C_in], a [B, C_in, H*n], b [B, H*n, C_out],
    bias [B, C_out], scale [B]; attribute n_tokens.  -> base + scale * (softmax_heads(x a) b + bias)
``pidrt::dual_kv``  q [B, N, C], k [B, M, C], v [B, M, C], k2 [B, M2, C], v2 [B, M2, C], sigma [B];
    attribute heads.  -> attn(q, k, v) + sigma * attn(q, k2, v2), heads merged, [B, N, C]

While tracing, each node's forward runs the torch reference, so the traced values stay right.
`lower_plugin_nodes` rewrites the nodes back into plain ONNX ops, which lets onnxruntime check a
plugin graph against the plain export where TensorRT is absent.
"""

from __future__ import annotations

import torch

from pidrt.models.attention import attend, merge_heads, split_heads
from pidrt.models.folded import FoldedBranch, apply_folded

NAMESPACE = "pidrt"
OPS = ("few_token", "dual_kv")


def _node(g, op: str, *inputs, **attrs):
    out = g.op(f"{NAMESPACE}::{op}", *inputs, plugin_namespace_s=NAMESPACE, aot_i=1, **attrs)
    out.setType(inputs[0].type())
    return out


class _FewToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, x, a, b, bias, scale, n_tokens: int):
        zero = torch.zeros(1, 1, dtype=a.dtype, device=a.device)
        return apply_folded(base, x, FoldedBranch(a, b, zero, bias, n_tokens), scale)

    @staticmethod
    def symbolic(g, base, x, a, b, bias, scale, n_tokens: int):
        return _node(g, "few_token", base, x, a, b, bias, scale, n_tokens_i=n_tokens)


class _DualKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k2, v2, sigma, heads: int):
        both = attend(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        both = both + sigma.to(q.dtype).view(-1, 1, 1, 1) * attend(
            split_heads(q, heads), split_heads(k2, heads), split_heads(v2, heads))
        return merge_heads(both).to(q.dtype)

    @staticmethod
    def symbolic(g, q, k, v, k2, v2, sigma, heads: int):
        return _node(g, "dual_kv", q, k, v, k2, v2, sigma, heads_i=heads)


class PluginNodes:
    """`FusedOps` that trace to plugin nodes (used by `UNetGraph` when its spec has plugins)."""

    def few_token(self, base, x, branch: FoldedBranch, scale):
        # Export graphs have no score bias (zero for IP-Adapter and pre_out SCA; inputs.py
        # refuses post_out payloads), so the node has no input for it.
        return _FewToken.apply(base, x, branch.a, branch.b, branch.out_bias, scale, int(branch.n_tokens))

    def dual_kv(self, query, key, value, keys2, values2, sigma, heads: int):
        return _DualKV.apply(query, key, value, keys2, values2, sigma, int(heads))

    def __repr__(self) -> str:
        return "PluginNodes()"


def plugin_nodes(model) -> list:
    """The pidrt plugin nodes of an ONNX model."""
    return [n for n in model.graph.node if n.domain == NAMESPACE and n.op_type in OPS]


def lower_plugin_nodes(model):
    """A copy of `model` with every pidrt plugin node replaced by the same maths in plain ONNX ops."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    lowering = _Lowering()
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.domain != NAMESPACE or node.op_type not in OPS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        lower = lowering.few_token if node.op_type == "few_token" else lowering.dual_kv
        nodes += lower(f"pidrt_lowered_{i}", list(node.input), node.output[0], attrs)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    have = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(t for t in lowering.constants.values() if t.name not in have)
    kept = [o for o in model.opset_import if o.domain != NAMESPACE]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


class _Lowering:
    """Builds the plain-op subgraphs; shares the int64 shape constants they use as initializers."""

    def __init__(self):
        self.constants: dict[str, object] = {}

    def shape(self, values: list[int]) -> str:
        import numpy as np
        from onnx import numpy_helper

        name = "pidrt_lowered_shape_" + "_".join(str(v).replace("-", "m") for v in values)
        if name not in self.constants:
            self.constants[name] = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
        return name

    def few_token(self, p: str, inputs: list[str], out: str, attrs: dict) -> list:
        from onnx.helper import make_node as mk

        base, x, a, b, bias, scale = inputs
        return [
            mk("MatMul", [x, a], [f"{p}_scores"]),
            mk("Reshape", [f"{p}_scores", self.shape([0, 0, -1, attrs["n_tokens"]])], [f"{p}_grouped"]),
            mk("Softmax", [f"{p}_grouped"], [f"{p}_probs_g"], axis=-1),
            mk("Reshape", [f"{p}_probs_g", self.shape([0, 0, -1])], [f"{p}_probs"]),
            mk("MatMul", [f"{p}_probs", b], [f"{p}_mixed"]),
            mk("Unsqueeze", [bias, self.shape([1])], [f"{p}_bias"]),
            mk("Add", [f"{p}_mixed", f"{p}_bias"], [f"{p}_branch"]),
            mk("Reshape", [scale, self.shape([-1, 1, 1])], [f"{p}_scale"]),
            mk("Mul", [f"{p}_branch", f"{p}_scale"], [f"{p}_scaled"]),
            mk("Add", [base, f"{p}_scaled"], [out]),
        ]

    def dual_kv(self, p: str, inputs: list[str], out: str, attrs: dict) -> list:
        from onnx.helper import make_node as mk

        q, k, v, k2, v2, sigma = inputs
        split = self.shape([0, 0, attrs["heads"], -1])
        nodes = [mk("Reshape", [q, split], [f"{p}_q4"]),
                 mk("Transpose", [f"{p}_q4"], [f"{p}_qh"], perm=[0, 2, 1, 3]),
                 mk("Shape", [f"{p}_qh"], [f"{p}_d_int"], start=3),
                 mk("CastLike", [f"{p}_d_int", q], [f"{p}_d"]),
                 mk("Sqrt", [f"{p}_d"], [f"{p}_sqrt_d"])]

        def attention(tag: str, key: str, value: str) -> str:
            t = f"{p}_{tag}"
            nodes.extend([
                mk("Reshape", [key, split], [f"{t}_k4"]),
                mk("Transpose", [f"{t}_k4"], [f"{t}_kt"], perm=[0, 2, 3, 1]),
                mk("Reshape", [value, split], [f"{t}_v4"]),
                mk("Transpose", [f"{t}_v4"], [f"{t}_vh"], perm=[0, 2, 1, 3]),
                mk("MatMul", [f"{p}_qh", f"{t}_kt"], [f"{t}_s"]),
                mk("Div", [f"{t}_s", f"{p}_sqrt_d"], [f"{t}_scaled"]),
                mk("Softmax", [f"{t}_scaled"], [f"{t}_p"], axis=-1),
                mk("MatMul", [f"{t}_p", f"{t}_vh"], [f"{t}_o"]),
            ])
            return f"{t}_o"

        first, second = attention("a", k, v), attention("b", k2, v2)
        nodes += [mk("Reshape", [sigma, self.shape([-1, 1, 1, 1])], [f"{p}_sigma"]),
                  mk("Mul", [second, f"{p}_sigma"], [f"{p}_second"]),
                  mk("Add", [first, f"{p}_second"], [f"{p}_both"]),
                  mk("Transpose", [f"{p}_both"], [f"{p}_merged4"], perm=[0, 2, 1, 3]),
                  mk("Reshape", [f"{p}_merged4", self.shape([0, 0, -1])], [out])]
        return nodes

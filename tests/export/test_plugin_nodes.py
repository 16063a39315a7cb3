"""Exports with TensorRT plugin nodes (`--trt-plugins`): node contracts, and the graph checked on CPU.

TensorRT is absent here, so the graphs are run by onnxruntime with the plugin nodes lowered to
plain ops: equal to the torch reference and to the plain export on the same inputs, which pins
each node's inputs, order and attributes to the maths the kernels implement (tests/kernels
check the kernels' TensorRT launch plans against the same references).
"""

from __future__ import annotations

import json

import onnx
import pytest

from pidrt.engines.ort_backend import OrtRunner
from pidrt.export.commands import ExportOptions, _feed_for, export_models, verify
from pidrt.export.manifest import graph_entries, models_from_source
from pidrt.export.plugin_nodes import lower_plugin_nodes, plugin_nodes
from pidrt.export.specs import ModelSpec, SpecOptions
from pidrt.export.testing import tiny_export


@pytest.fixture(scope="module")
def plugin_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugins")
    for method in ("sca", "ip", "eaa"):
        export_models("tiny", method, out, False, ExportOptions(kinds=("unet",), spec=SpecOptions(plugins=True)))
    return out


@pytest.mark.parametrize("method,op,attr", [("sca", "few_token", "n_tokens"), ("ip", "few_token", "n_tokens"),
                                             ("eaa", "dual_kv", "heads")])
def test_one_plugin_node_per_identity_layer(plugin_export, method, op, attr):
    entry = graph_entries(plugin_export)[f"unet_{method}_fp32_plugins"]
    assert entry.spec.plugins
    model = onnx.load(str(entry.path))
    nodes = plugin_nodes(model)
    assert len(nodes) == len(entry.spec.identity_layers) and {n.op_type for n in nodes} == {op}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # What TensorRT's ONNX parser needs to pick the ahead-of-time plugin.
        assert attrs["plugin_namespace"] == b"pidrt" and attrs["aot"] == 1 and len(node.input) == 6
        assert attrs[attr] == (entry.spec.n_tokens if attr == "n_tokens" else 8)
    manifest = json.loads((plugin_export / "manifest.json").read_text())
    assert manifest["graphs"][entry.name]["trt_problems"] == []


def test_plugin_graphs_match_the_reference_on_onnxruntime(plugin_export):
    report = verify(plugin_export, "ort")
    assert set(report["graphs"]) == {"unet_sca_fp32_plugins", "unet_ip_fp32_plugins", "unet_eaa_fp32_plugins"}
    for name, r in report["graphs"].items():
        assert r["max_abs"] < 1e-4, (name, r)


@pytest.mark.parametrize("method", ["sca", "eaa"])
def test_plugin_graph_equals_the_plain_graph(plugin_export, method):
    plain = graph_entries(tiny_export(method))[f"unet_{method}_fp32"]
    plugged = graph_entries(plugin_export)[f"unet_{method}_fp32_plugins"]
    assert plain.spec.inputs == plugged.spec.inputs  # same contract: a runner feeds either
    models = models_from_source(plugged.source)
    feed, _, _ = _feed_for(models, plugged.spec, 8, 16, seed=3)
    outs = [OrtRunner(e.spec, e.path, threads=1).run(feed)["noise_pred"] for e in (plain, plugged)]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_lowering_leaves_no_custom_nodes(plugin_export):
    entry = graph_entries(plugin_export)["unet_eaa_fp32_plugins"]
    lowered = lower_plugin_nodes(onnx.load(str(entry.path)))
    assert not plugin_nodes(lowered) and all(o.domain != "pidrt" for o in lowered.opset_import)
    onnx.checker.check_model(lowered)


def test_fp16_plugin_nodes_keep_the_graph_dtype(tmp_path):
    export_models("tiny", "eaa", tmp_path, True, ExportOptions(kinds=("unet",), spec=SpecOptions(plugins=True)))
    entry = graph_entries(tmp_path)["unet_eaa_fp16_plugins"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(entry.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    outs = [n.output[0] for n in plugin_nodes(model)]
    assert outs and all(types.get(o) == onnx.TensorProto.FLOAT16 for o in outs)
    r = verify(tmp_path, "ort")["graphs"]["unet_eaa_fp16_plugins"]
    assert r["max_rel"] < 2e-2


def test_spec_round_trip_and_old_manifests():
    from pidrt.export.specs import unet_spec
    from pidrt.models.attention import attention_layers
    from pidrt.models.build import build_unet
    from pidrt.models.presets import TINY

    layers = attention_layers(build_unet(TINY, seed=0))
    spec = unet_spec(TINY, layers, "sca", plugins=True)
    assert spec.name == "unet_sca_fp32_plugins" and ModelSpec.from_json(spec.to_json()) == spec
    old = spec.to_json()
    del old["plugins"]  # manifests written before the option existed
    assert not ModelSpec.from_json(old).plugins
    base = unet_spec(TINY, layers, "none", plugins=True)
    assert not base.plugins and base.name == "unet_none_fp32"  # no branch, nothing to plug in

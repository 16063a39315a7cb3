"""Exported tiny graphs on onnxruntime (CPU) against the torch reference, and the export's checks."""

from __future__ import annotations

import onnx
import pytest
import torch

from pidrt.engines.ort_backend import OrtRunner
from pidrt.export.commands import reference_output
from pidrt.export.inputs import random_identity_batch, unet_feed
from pidrt.export.manifest import find_graph, graph_entries, read_manifest
from pidrt.export.testing import tiny_export
from pidrt.export.trt_supported_ops import check_graph
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.runtime.pipeline import Pipeline



@pytest.fixture(scope="module")
def models():
    return build_random(TINY, seed=0)


@pytest.fixture(scope="module")
def graphs():
    # One folder for the module (and tests/engines): the UNet of each method is exported by
    # its own test below, text encoder and VAE here.
    return tiny_export("none", kinds=("text_encoder", "vae_decoder", "vae_encoder"))


def check_ops(entry) -> onnx.ModelProto:
    model = onnx.load(str(entry.path))
    assert check_graph(model) == [], entry.name
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    return model


# ip and eaa each cost one more UNet export (~15 s on 2 cores): slow, to keep the fast suite near
# 60 s; none and sca (the folded branch) stay fast; CI runs all four.
@pytest.mark.parametrize("method", ["none", "sca", pytest.param("ip", marks=pytest.mark.slow),
                                    pytest.param("eaa", marks=pytest.mark.slow)])
def test_unet_matches_torch_on_mixed_identity_batch(models, graphs, method):
    """[identity 1, identity 2, no identity at scale 0] at latent 8x8 and 16x16 (both in the profile);
    element 1 also reads its own V context (a token identity), the others K = V (ordinary prompts)."""
    entry = find_graph(tiny_export(method), "unet", method, "float32")
    model = check_ops(entry)
    # The broadcast zero score-bias Adds of the folded branches are gone after cleanup
    # (zero [C] biases of the random tiny weights are ordinary Adds and stay).
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = {n for n, a in arrays.items() if a.ndim and all(d == 1 for d in a.shape) and not a.any()}
    assert not [n.name for n in model.graph.node if n.op_type == "Add" and set(n.input) & zeros]
    runner = OrtRunner(entry.spec, entry.path, threads=1)
    for side in (8, 16):
        g = torch.Generator().manual_seed(side)
        sample, ctx = torch.randn(3, 4, side, side, generator=g), torch.randn(3, 77, 32, generator=g)
        value_context = ctx.clone()
        value_context[1] = torch.randn(77, 32, generator=g)
        payloads, scale = random_identity_batch(models.unet, entry.spec, side, side, seed=side)
        feed = unet_feed(entry.spec, sample, torch.tensor([999.0, 500.0, 20.0]), ctx, scale, payloads, value_context)
        got = runner.run(feed)["noise_pred"]
        ref = reference_output(models, entry.spec, feed, payloads, scale)
        assert (got - ref).abs().max() < 1e-4
        same_v = runner.run(unet_feed(entry.spec, sample, feed["timestep"], ctx, scale, payloads))["noise_pred"]
        assert (got[1] - same_v[1]).abs().max() > 1e-3  # the V context does act
        assert (got[[0, 2]] - same_v[[0, 2]]).abs().max() < 1e-5
        if method != "none":
            base = reference_output(models, entry.spec, feed)  # no payloads at all
            assert (got[2] - base[2]).abs().max() < 1e-4  # scale 0: the plain UNet
            assert (got[0] - base[0]).abs().max() > 1e-3  # the branch does act


def test_text_encoder_and_vae_match_the_pipeline(models, graphs):
    pipe = Pipeline(models)
    ids = models.tokenizer(["a photo of a person", "", "x y z"])
    text = find_graph(graphs, "text_encoder")
    got = OrtRunner(text.spec, text.path, threads=1).run({"input_ids": ids.to(torch.int32)})["last_hidden_state"]
    assert (got - pipe.encode_text(["a photo of a person", "", "x y z"])).abs().max() < 1e-4

    dec, enc = find_graph(graphs, "vae_decoder"), find_graph(graphs, "vae_encoder")
    for side in (8, 16):
        latent = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(side))
        images = OrtRunner(dec.spec, dec.path, threads=1).run({"latent": latent})["images"]
        assert images.shape == (2, 3, side * 8, side * 8)
        assert (images - pipe.decode(latent)).abs().max() < 1e-4
        back = OrtRunner(enc.spec, enc.path, threads=1).run({"images": images})["latent"]
        assert (back - pipe.encode_image(images)).abs().max() < 1e-4


def test_every_graph_parses_in_tensorrt_op_table(graphs):
    """Text encoder and VAE here; each UNet in its own test (all graphs of the folder are checked)."""
    entries = graph_entries(graphs)
    assert {"text_encoder_fp32", "vae_decoder_fp32", "vae_encoder_fp32"} <= set(entries)
    for entry in entries.values():
        check_ops(entry)
        assert not read_manifest(graphs)["graphs"][entry.name]["trt_problems"]


def test_op_check_reports_what_tensorrt_rejects():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])
    d = onnx.helper.make_tensor_value_info("d", onnx.TensorProto.DOUBLE, [4])
    nodes = [onnx.helper.make_node("Unique", ["x"], ["y"]),
             onnx.helper.make_node("Resize", ["x", "", "s"], ["r"], mode="cubic"),
             onnx.helper.make_node("MatMul", ["d", "d"], ["m"]),
             onnx.helper.make_node("Foo", ["x"], ["f"], domain="custom")]
    s = onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [1], [2.0])
    graph = onnx.helper.make_graph(nodes, "g", [x, d], [y], initializer=[s])
    problems = check_graph(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    assert any(p.startswith("Unique: not supported") for p in problems)
    assert any("Resize" in p and "cubic" in p for p in problems)
    assert any("MatMul: input type DOUBLE" in p for p in problems)
    assert any("custom-domain" in p for p in problems)
    old = onnx.helper.make_model(onnx.helper.make_graph([], "g", [x], [x]), opset_imports=[onnx.helper.make_opsetid("", 7)])
    assert check_graph(old) == ["opset 7 outside TensorRT's range (9, 24)"]

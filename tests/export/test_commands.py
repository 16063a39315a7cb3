"""export_models / verify / build: manifest, cached re-export, external data, fp16, the TensorRT gate."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from pidrt.errors import MissingDependencyError, PidrtError
from pidrt.export import onnx_export
from pidrt.export.commands import ExportOptions, VerifyOptions, build, export_models, verify
from pidrt.export.manifest import find_graph, graph_entries, read_manifest
from pidrt.export.testing import tiny_export
from pidrt.models.build import build_random
from pidrt.models.presets import TINY

TEXT = ExportOptions(kinds=("text_encoder",))


def test_manifest_and_cached_re_export(tmp_path):
    models = build_random(TINY, seed=0)
    path = export_models(models, "none", tmp_path, options=ExportOptions(kinds=("text_encoder", "vae_decoder")))
    manifest = json.loads(path.read_text())
    entry = manifest["graphs"]["text_encoder_fp32"]
    assert entry["inputs"] == ["input_ids"] and entry["opset"] == 18 and entry["dtype"] == "float32"
    assert entry["trt_problems"] == [] and entry["source"]["models"] == "random:tiny:seed=0"
    stamp = {n: (tmp_path / g["file"]).stat().st_mtime_ns for n, g in manifest["graphs"].items()}

    export_models(models, "none", tmp_path, options=ExportOptions(kinds=("text_encoder", "vae_decoder")))
    assert {n: (tmp_path / g["file"]).stat().st_mtime_ns for n, g in manifest["graphs"].items()} == stamp

    with torch.no_grad():  # other weights: a new key, so only that graph is exported again
        next(models.text_encoder.parameters()).add_(1.0)
    export_models(models, "none", tmp_path, options=ExportOptions(kinds=("text_encoder", "vae_decoder")))
    again = read_manifest(tmp_path)["graphs"]
    assert again["text_encoder_fp32"]["key"] != entry["key"]
    assert (tmp_path / "text_encoder_fp32.onnx").stat().st_mtime_ns != stamp["text_encoder_fp32"]
    assert (tmp_path / "vae_decoder_fp32.onnx").stat().st_mtime_ns == stamp["vae_decoder_fp32"]

    (tmp_path / "vae_decoder_fp32.onnx").write_bytes(b"truncated")  # damaged file: exported again
    export_models(models, "none", tmp_path, options=ExportOptions(kinds=("vae_decoder",)))
    onnx.checker.check_model(str(tmp_path / "vae_decoder_fp32.onnx"))


def test_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    """The >2 GB path, exercised on a small graph by lowering the threshold."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    export_models("tiny", "none", tmp_path, options=TEXT)
    entry = find_graph(tmp_path, "text_encoder")
    assert entry.data and (tmp_path / entry.data).is_file() and entry.files_present()
    assert entry.path.stat().st_size < 100_000  # weights are out of the .onnx
    onnx.checker.check_model(str(entry.path))
    result = verify(tmp_path, "ort", VerifyOptions(backend_options={"threads": 1}))
    assert result["graphs"]["text_encoder_fp32"]["max_abs"] < 1e-4
    # A forced re-export writes a new data file (named by key) and removes the stale one.
    old = entry.data
    with torch.no_grad():
        models = build_random(TINY, seed=0)
        next(models.text_encoder.parameters()).add_(0.5)
    export_models(models, "none", tmp_path, options=TEXT)
    new = find_graph(tmp_path, "text_encoder").data
    assert new != old and not (tmp_path / old).exists() and (tmp_path / new).is_file()


def test_verify_reports_errors_per_graph():
    folder = tiny_export("sca")
    report = verify(folder, "ort", VerifyOptions(graphs=("unet_sca_fp32",), backend_options={"threads": 1}))
    unet = report["graphs"]["unet_sca_fp32"]
    assert report["backend"] == "ort" and unet["sizes"] == [[8, 8], [16, 16]]
    assert unet["max_abs"] < 1e-4 and unet["max_rel"] < 1e-4
    with pytest.raises(PidrtError, match="no graphs"):
        verify(folder, "ort", VerifyOptions(graphs=("unet_xyz",)))
    with pytest.raises(PidrtError, match="not the ones"):
        verify(folder, "torch", VerifyOptions(graphs=("unet_sca_fp32",)), models=build_random(TINY, seed=1))


def test_fp16_graphs(tmp_path):
    export_models("tiny", "none", tmp_path, fp16=True, options=ExportOptions(kinds=("text_encoder", "vae_decoder")))
    entries = graph_entries(tmp_path)
    assert sorted(entries) == ["text_encoder_fp16", "vae_decoder_fp16"]
    model = onnx.load(str(entries["vae_decoder_fp16"].path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = verify(tmp_path, "ort", VerifyOptions(backend_options={"threads": 1}))["graphs"]
    assert report["text_encoder_fp16"]["max_rel"] < 1e-2 and report["vae_decoder_fp16"]["max_abs"] < 1e-2


@pytest.mark.slow
def test_fp16_unet_with_identities():
    folder = tiny_export("sca", fp16=True)
    report = verify(folder, "ort", VerifyOptions(backend_options={"threads": 1}))["graphs"]["unet_sca_fp16"]
    assert report["max_rel"] < 1e-2


def test_build_needs_tensorrt(tmp_path):
    folder = tiny_export("none")
    with pytest.raises(PidrtError, match="only 'trt'"):
        build(folder, "ort")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pidrt\[trt\]"):
            build(folder, "trt")
    with pytest.raises(PidrtError, match="no export manifest"):
        verify(tmp_path, "ort")


def test_unknown_method_and_kind(tmp_path):
    with pytest.raises(PidrtError, match="identity method"):
        export_models("tiny", "lora", tmp_path, options=ExportOptions(kinds=("unet",)))
    with pytest.raises(PidrtError, match="graph kind"):
        export_models("tiny", "none", tmp_path, options=ExportOptions(kinds=("vae",)))


@pytest.mark.slow
def test_sd15_unet_export(tmp_path):
    """The full SD1.5 UNet shape (random weights): > 2 GB in fp32, so weights go to external data."""
    from pidrt.export.trt_supported_ops import check_graph
    from pidrt.models.presets import SD15

    path = export_models(SD15, "sca", tmp_path, options=ExportOptions(kinds=("unet",)))
    entry = find_graph(tmp_path, "unet", "sca")
    assert entry.data is not None and entry.bytes > 2**31
    assert json.loads(path.read_text())["graphs"]["unet_sca_fp32"]["trt_problems"] == []
    model = onnx.load(str(entry.path), load_external_data=False)
    assert check_graph(model) == []
    assert len([i for i in model.graph.input if i.name.startswith("a_")]) == 16

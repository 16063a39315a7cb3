"""`pidrt generate --mode retouch`: --face enrolls with the reference path, the image, its layout
and the sidecar's retouch fields and UNet calls; retouch options without the mode are refused."""

from __future__ import annotations

import json

from PIL import Image

from pidrt.cli import main

ARGS = ["generate", "--prompt", "a photo of a man", "--steps", "4", "--guidance", "5", "--size", "64x64",
        "--seed", "3", "--detector", "haar", "--no-progress", "--backend", "torch"]


def test_generate_retouch_writes_image_layout_and_calls(tmp_path, capsys, photos):
    face = tmp_path / "face.png"
    face.write_bytes(photos[0])
    out = tmp_path / "beach.png"
    argv = [*ARGS, "--store", str(tmp_path / "store"), "--out", str(out), "--face", str(face), "--mode", "retouch",
            "--subject", "man", "--layout-steps", "1", "--swap-start", "1", "--reference-start", "2",
            "--return-layout"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["retouch"]["layouts"] == ["beach-layout.png"] and sidecar["retouch"]["subject"] == "man"
    assert sidecar["retouch"]["unet_calls"] == {"stage1": 4, "layout_inversion": 4, "stage2": 4, "total": 12}
    assert Image.open(tmp_path / "beach-layout.png").size == Image.open(out).size == (64, 64)
    ident = sidecar["identity"]
    assert (tmp_path / "store" / "retouch-reference" / f"{ident}.safetensors").is_file()
    assert main(["identities", "delete", ident, "--store", str(tmp_path / "store")]) == 0
    assert not (tmp_path / "store" / "retouch-reference" / f"{ident}.safetensors").exists()


def test_retouch_arguments_are_checked_before_models_load(tmp_path, capsys):
    for extra, words in [(["--subject", "man"], "--subject goes with --mode retouch"),
                         (["--mode", "retouch", "--subject", "man"], "needs an identity"),
                         (["--mode", "retouch", "--identity", "ip-0123456789abcdef"], "needs the subject"),
                         (["--mode", "retouch", "--identity", "ip-0123456789abcdef", "--subject", "man",
                           "--subject-mask", str(tmp_path / "none.png")], "no such mask")]:
        assert main([*ARGS, "--out", str(tmp_path), *extra]) == 2
        assert words in capsys.readouterr().err, words


def test_export_retouch_flags(tmp_path, capsys, monkeypatch):
    import pidrt.export.commands as commands

    seen = {}
    monkeypatch.setattr(commands, "export_models", lambda source, method, out, fp16, options: seen.setdefault(
        "blocks", options.spec.retouch_blocks) and out / "manifest.json")
    assert main(["export", "--out", str(tmp_path), "--retouch"]) == 0 and seen.pop("blocks") == (10, 16)
    assert main(["export", "--out", str(tmp_path), "--retouch", "--retouch-blocks", "12", "16"]) == 0
    assert seen["blocks"] == (12, 16)
    capsys.readouterr()
    assert main(["export", "--out", str(tmp_path), "--retouch-blocks", "12", "16"]) == 2
    assert "--retouch-blocks goes with --retouch" in capsys.readouterr().err

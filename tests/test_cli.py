"""The `pidrt` command: demo end to end, enroll + identities, clean errors, doctor."""

from __future__ import annotations

import argparse
import json

import pytest

from pidrt.cli import main
from pidrt.runtime.demo import sample_face_photo


@pytest.mark.slow
def test_demo_writes_images_and_report(tmp_path, capsys):
    import torch

    from pidrt.bench.env import device_info

    photo, _ = sample_face_photo()
    face = tmp_path / "me.png"
    face.write_bytes(photo)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--face", str(face), "--detector", "haar"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "identity branch" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert set(report["images"]) == {"none", "sca", "ip", "eaa"}
    assert all((out / name).is_file() for name in report["images"].values())
    assert all(v < 1e-5 for v in report["folded_vs_unfolded_max_abs"].values())
    assert {"enroll_sca_s", "enroll_ip_s", "enroll_eaa_s", "generate_sca_unet_loop_s"} <= set(report["stages_s"])
    assert report["photo"] == str(face) and report["face_detector"].startswith("haar")
    assert report["prompt"] and report["seed"] == 42 and report["device"] == device_info(torch.device("cpu"))["name"]
    assert {m: i["scale"] for m, i in report["identities"].items()} == {"sca": 0.4, "ip": 1.0, "eaa": 0.8}


def test_enroll_then_identities(tmp_path, capsys):
    photo, _ = sample_face_photo()
    face = tmp_path / "face.jpg"
    face.write_bytes(photo)
    store = tmp_path / "store"
    assert main(["enroll", "--method", "ip", "--face", str(face), "--store", str(store)]) == 0
    enrolled = json.loads(capsys.readouterr().out)
    assert enrolled["id"].startswith("ip-") and enrolled["created"]
    assert main(["enroll", "--method", "ip", "--face", str(face), "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out) | {"seconds": 0} == enrolled | {"created": False, "seconds": 0}
    assert main(["identities", "list", "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == enrolled["id"]
    assert main(["identities", "show", enrolled["id"], "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ip"
    assert main(["identities", "delete", enrolled["id"], "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["identities", "show", enrolled["id"], "--store", str(store)]) == 2
    assert "unknown identity" in capsys.readouterr().err


def test_bad_input_is_a_clean_error(tmp_path, capsys):
    assert main(["enroll", "--method", "sca", "--face", str(tmp_path / "nope.jpg"), "--store", str(tmp_path)]) == 2
    assert "no such image file" in capsys.readouterr().err
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert main(["enroll", "--method", "sca", "--face", str(tmp_path / "junk.jpg"), "--store", str(tmp_path)]) == 2
    assert "pidrt: error:" in capsys.readouterr().err


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "torch" in report and "kernels" in report
    assert set(report["face_detectors"]) == {"insightface", "mtcnn", "haar", "auto"}
    if "ptx_isa" in report:  # with triton: the ISA it writes, and what the driver (if any) loads
        assert report["ptx_isa"]["triton_writes"].count(".") == 1 and report["ptx_isa"]["cuda_driver_takes"]


def test_export_verify_build(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--preset", "tiny", "--method", "sca", "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(out), "--backend", "ort"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and all(g["max_abs"] < 1e-4 for g in report["graphs"].values())
    # A tolerance below the measured error fails those graphs. ORT and torch may agree bit for bit
    # on some machine (every error 0): then even --atol 0 passes, and that is what is checked.
    worst = max(g["max_abs"] for g in report["graphs"].values())
    atol = worst / 2
    assert main(["verify", str(out), "--backend", "ort", "--atol", repr(atol)]) == (1 if worst > 0 else 0)
    strict = json.loads(capsys.readouterr().out)
    assert strict["failed"] == sorted(n for n, g in strict["graphs"].items() if g["max_abs"] > atol)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["build", str(out)]) == 2
        assert "pidrt[trt]" in capsys.readouterr().err


def _commands():
    from pidrt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_help_shows_every_option_with_its_default(capsys):
    parser, commands = _commands()
    for name, p in [("pidrt", parser), *commands.items()]:
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            text = formatter._get_help_string(action)
            assert "default" in text.lower(), (name, action.option_strings, text)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--port PORT" in out and "(default: 8000)" in out and "(default: 127.0.0.1)" in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: pidrt bench") and "argparse at the edge" not in out and "(default: 30)" in out
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "{trt}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "70000"], "1..65535"),
    (["serve", "--port", "0"], "1..65535"),
    (["enroll", "--method", "eaa", "--face", "x.jpg", "--store", "s", "--resolution", "0"], "at least 1"),
    (["demo", "--steps", "0"], "at least 1"),
    (["build", "d", "--backend", "ort"], "invalid choice"),
])
def test_bad_numbers_and_choices_are_refused_by_the_parser(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_store_and_output_folder_errors(tmp_path, capsys, monkeypatch):
    import pidrt.serve.factory as factory

    a_file = tmp_path / "file"
    a_file.write_text("x")
    photo, _ = sample_face_photo()
    face = tmp_path / "face.png"
    face.write_bytes(photo)
    for argv, words in [
        (["enroll", "--method", "ip", "--face", str(face), "--store", str(a_file)], "is a file"),
        (["enroll", "--method", "ip", "--face", str(face), "--store", str(a_file / "sub")], "cannot create"),
        (["identities", "list", "--store", str(a_file)], "is a file"),
        (["identities", "list", "--store", str(tmp_path / "typo")], "no identity store"),
        (["serve", "--store", str(a_file)], "is a file"),
        (["export", "--out", str(a_file)], "is a file"),
        (["demo", "--out", str(a_file)], "is a file"),
        (["demo", "--out", str(tmp_path / "d"), "--face", str(tmp_path / "missing.jpg")], "no such image file"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.png", "file"]  # nothing made, no typo store

    # A non-loopback host without keys is refused before any model loads.
    monkeypatch.delenv("PIDRT_API_KEYS", raising=False)
    monkeypatch.setattr(factory, "build_generator", lambda *a, **k: pytest.fail("models loaded"))
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s")]) == 2
    assert "without API keys" in capsys.readouterr().err
    keys = tmp_path / "keys"
    keys.write_text("short\n")
    assert main(["serve", "--api-key-file", str(keys), "--store", str(tmp_path / "s")]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_export_without_its_dependency_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import pidrt.errors

    real = pidrt.errors.require

    def fake(module, extra):
        if module == "onnx":
            raise pidrt.errors.MissingDependencyError(f"'{module}' is needed here; pip install 'pidrt[{extra}]'")
        return real(module, extra)

    monkeypatch.setattr(pidrt.errors, "require", fake)
    out = tmp_path / "export"
    assert main(["export", "--preset", "tiny", "--out", str(out)]) == 2
    assert "pidrt[onnx]" in capsys.readouterr().err and not out.exists()

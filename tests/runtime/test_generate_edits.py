"""`pidrt generate --init-image`: an inpainting edit written with its strength in the PNG
parameters and the sidecar; a bad edit exits 2 before any model loads."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pidrt.cli import main

COMMON = ["generate", "--prompt", "a portrait", "--steps", "2", "--size", "64x64", "--seed", "3", "--no-progress",
          "--backend", "torch", "--detector", "haar"]


def test_generate_inpaints_from_files(tmp_path, capsys):
    Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255  # no alpha: white = repaint
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code = main([*COMMON, "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.5", "--store", str(tmp_path / "store"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64) and "Denoising strength: 0.5" in Image.open(out).text["parameters"]
    edit = json.loads(out.with_suffix(".json").read_text())["edit"]
    assert edit["strength"] == 0.5 and edit["mask"] and edit["start_step"] == 1


def test_bad_edits_exit_2(tmp_path, capsys):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    for extra, message in ((["--restore-face"], "no face found"), (["--strength", "1.5"], "strength must be"),
                           (["--mask", str(tmp_path / "nope.png")], "cannot read the mask")):
        assert main([*COMMON, "--init-image", str(tmp_path / "flat.png"), *extra, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "pidrt: error:" in err and message in err, err

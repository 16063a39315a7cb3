"""`pidrt enroll --method tokens`, `pidrt identities` and `pidrt generate --tokens` on the tiny preset."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from pidrt.cli import main
from pidrt.models.presets import TINY

D = TINY.text.hidden_size


def test_token_files_on_the_command_line(tmp_path, capsys):
    store, good, wide = tmp_path / "store", tmp_path / "learned_embeds.safetensors", tmp_path / "wide.safetensors"
    save_file({"<cat>": torch.randn(2, D, generator=torch.Generator().manual_seed(0))}, str(good))
    save_file({"<cat>": torch.zeros(1, D + 1)}, str(wide))
    for args, words in [
        (["--tokens", str(wide)], f"{D + 1}-wide tokens"),
        (["--tokens", str(tmp_path / "missing.pt")], "no such token file"),
        ([], "--method tokens takes --tokens FILE"),
    ]:
        assert main(["enroll", "--method", "tokens", "--store", str(store), *args]) == 2
        assert words in capsys.readouterr().err
    assert main(["enroll", "--method", "ip", "--tokens", str(good), "--store", str(store)]) == 2
    assert "--face" in capsys.readouterr().err

    # The file imported on the fly by generate (as --face is); one model build for the whole test.
    common = ["generate", "--steps", "1", "--size", "64x64", "--seed", "1", "--no-progress", "--store", str(store)]
    assert main([*common, "--prompt", "a <dog>", "--tokens", "me.pt", "--out", str(tmp_path)]) == 2
    assert "no such token file" in capsys.readouterr().err
    assert main([*common, "--prompt", "a <kitty>", "--tokens", str(good), "--placeholder", "<kitty>",
                 "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    ident = json.loads((tmp_path / "a.json").read_text())["tokens"]
    assert main(["identities", "list", "--store", str(store)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["id"], row["placeholder"], row["stages"], row["tokens"]) == (ident, "<kitty>", 1, 2)

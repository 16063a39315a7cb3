"""load_models: diffusers folders and LDM single files round-trip exactly; bad files fail clearly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pidrt.errors import FormatError  # noqa: E402
from pidrt.models.build import Models, build_random  # noqa: E402
from pidrt.models.loading import load_models  # noqa: E402
from pidrt.models.presets import TINY  # noqa: E402
from pidrt.models.tokenizer import ClipTokenizer, HashTokenizer  # noqa: E402

try:  # tests/ has no __init__.py today (pytest puts this folder on sys.path); keep working if one is added
    from .ldm_layout import to_ldm  # noqa: E402
except ImportError:
    from ldm_layout import to_ldm  # noqa: E402

UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte alphabet: the base symbols every CLIP vocab.json must contain."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> None:
    """A minimal CLIP BPE (bytes, bytes + </w>, two merges) whose ids fit TINY's 1024-word vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = ["c a", "ca t</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = TINY.text.bos_token_id, TINY.text.eos_token_id
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def ref() -> Models:
    return build_random(TINY, seed=3)


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusers") / "sd"
    ref.unet.save_pretrained(root / "unet")
    ref.text_encoder.save_pretrained(root / "text_encoder")
    ref.vae.save_pretrained(root / "vae")
    write_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def ldm_state(ref) -> dict[str, torch.Tensor]:
    return to_ldm(ref.unet, ref.text_encoder, ref.vae, TINY)


@pytest.fixture(scope="module")
def single(ldm_state, tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file(ldm_state, str(file))
    return file


def assert_same_outputs(a: Models, b: Models) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY.text.vocab_size - 3, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    image = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        ha, hb = (m.text_encoder(ids).last_hidden_state for m in (a, b))
        assert (ha - hb).abs().max().item() == 0
        ua, ub = (m.unet(latents, 10, encoder_hidden_states=ha).sample for m in (a, b))
        assert (ua - ub).abs().max().item() == 0
        ea, eb = (m.vae.encode(image).latent_dist.mean for m in (a, b))
        assert (ea - eb).abs().max().item() == 0
        da, db = (m.vae.decode(latents).sample for m in (a, b))
        assert (da - db).abs().max().item() == 0


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "sd"))


# ------------------------------------------------------------------------------------ happy paths


def test_diffusers_folder_round_trip(ref, folder):
    loaded = load_models(folder, TINY)
    assert_same_outputs(ref, loaded)
    assert isinstance(loaded.tokenizer, ClipTokenizer)
    ids = loaded.tokenizer(["a cat"])
    assert ids.shape == (1, 77) and ids[0, 0] == TINY.text.bos_token_id and ids[0, 3] == TINY.text.eos_token_id
    assert loaded.name.startswith(f"folder:{folder.resolve()}:")
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    half = load_models(folder, TINY, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for m in (half.unet, half.text_encoder, half.vae) for p in m.parameters())


@pytest.mark.parametrize("text_model_prefix", [True, False], ids=["text_model", "old-clip-layout"])
def test_single_file_round_trip(ref, tmp_path, caplog, text_model_prefix):
    file = tmp_path / "tiny.safetensors"
    save_file(to_ldm(ref.unet, ref.text_encoder, ref.vae, TINY, text_model_prefix), str(file))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="pidrt.models.loading"):
        loaded = load_models(file, TINY)
    assert torch.equal(torch.rand(3), expected_draw), "loading must not disturb the caller's RNG"
    assert_same_outputs(ref, loaded)
    assert isinstance(loaded.tokenizer, HashTokenizer)
    assert "HashTokenizer" in caplog.text and "not be meaningful" in caplog.text
    st = file.stat()
    assert loaded.name == f"file:{file.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def test_single_file_tokenizer_sibling_and_argument(single, tmp_path):
    file = tmp_path / "model.safetensors"
    shutil.copy(single, file)
    write_tokenizer(tmp_path / "tokenizer")
    assert isinstance(load_models(file, TINY).tokenizer, ClipTokenizer)
    other = tmp_path / "elsewhere" / "tok"
    write_tokenizer(other)
    assert isinstance(load_models(single, TINY, tokenizer=other).tokenizer, ClipTokenizer)


def test_fp16_file_and_dtype(ldm_state, tmp_path):
    file = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in ldm_state.items()}, str(file))
    loaded = load_models(file, TINY, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for m in (loaded.unet, loaded.text_encoder, loaded.vae) for p in m.parameters())
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(loaded.unet.conv_out.weight, ldm_state[key].half())


# ------------------------------------------------------------------------------------ bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(FormatError, match="no such file or folder") as e:
        load_models(tmp_path / "nope", TINY)
    assert str(tmp_path / "nope") in str(e.value)


def test_folder_missing_subfolder(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    shutil.rmtree(root / "vae")
    with pytest.raises(FormatError, match=r"missing subfolder vae/"):
        load_models(root, TINY)


def test_folder_missing_unet_weights(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FormatError, match="missing weights file") as e:
        load_models(root, TINY)
    assert str(root / "unet") in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)


def test_folder_missing_config(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "text_encoder" / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json: missing"):
        load_models(root, TINY)


def test_folder_config_differs_from_preset(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    cfg_file = root / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 64
    cfg["use_linear_projection"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FormatError) as e:
        load_models(root, TINY)
    msg = str(e.value)
    assert str(cfg_file) in msg and "2 field(s)" in msg
    assert "cross_attention_dim: file has 64, preset has 32" in msg and "use_linear_projection" in msg


def test_folder_weights_missing_a_key(folder, tmp_path):
    from safetensors.torch import load_file

    root = copy_folder(folder, tmp_path)
    file = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    del state["decoder.conv_out.bias"]
    save_file(state, str(file))
    with pytest.raises(FormatError, match="decoder.conv_out.bias"):
        load_models(root, TINY)


def test_folder_without_tokenizer_files(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FormatError, match="merges.txt"):
        load_models(root, TINY)
    # An explicit tokenizer folder replaces the folder's own, which may then be absent altogether.
    shutil.rmtree(root / "tokenizer")
    write_tokenizer(tmp_path / "tok")
    assert isinstance(load_models(root, TINY, tokenizer=tmp_path / "tok").tokenizer, ClipTokenizer)


def test_truncated_safetensors(single, tmp_path):
    file = tmp_path / "cut.safetensors"
    file.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(FormatError, match="not a valid safetensors file") as e:
        load_models(file, TINY)
    assert str(file) in str(e.value)


def test_garbage_header(tmp_path):
    file = tmp_path / "junk.safetensors"
    file.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="not a valid safetensors file"):
        load_models(file, TINY)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_refused(tmp_path, suffix):
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FormatError, match="pickle") as e:
        load_models(file, TINY)
    assert str(file) in str(e.value) and ".safetensors" in str(e.value)


def test_renamed_ckpt_hint(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(FormatError, match="renamed .ckpt"):
        load_models(file, TINY)


def test_not_ldm_layout(folder, tmp_path):
    with pytest.raises(FormatError, match="not an LDM/CompVis") as e:
        load_models(folder / "unet" / "diffusion_pytorch_model.safetensors", TINY)
    assert "model.diffusion_model" in str(e.value)


def _save(state: dict, tmp_path: Path) -> Path:
    file = tmp_path / "bad.safetensors"
    save_file(state, str(file))
    return file


def test_checkpoint_with_removed_key(ldm_state, tmp_path):
    state = dict(ldm_state)
    del state[UNET_KEY]
    del state["first_stage_model.decoder.mid.attn_1.q.weight"]
    file = _save(state, tmp_path)
    with pytest.raises(FormatError) as e:
        load_models(file, TINY)
    msg = str(e.value)
    assert str(file) in msg
    assert "unet missing key(s): down_blocks.0.resnets.0.norm1.weight" in msg.replace("1 unet", "unet")
    assert "decoder.mid_block.attentions.0.to_q.weight" in msg


def test_checkpoint_missing_key_the_converter_indexes(ldm_state, tmp_path):
    state = dict(ldm_state)
    del state["model.diffusion_model.output_blocks.2.1.conv.bias"]
    with pytest.raises(FormatError, match=r"model\.diffusion_model\.output_blocks\.2\.1\.conv\.bias"):
        load_models(_save(state, tmp_path), TINY)


def test_checkpoint_with_extra_keys(ldm_state, tmp_path):
    state = dict(ldm_state)
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)
    state["first_stage_model.bogus.weight"] = torch.zeros(3)
    state["lora_unet_down.alpha"] = torch.zeros(1)
    with pytest.raises(FormatError) as e:
        load_models(_save(state, tmp_path), TINY)
    msg = str(e.value)
    for key in ("model.diffusion_model.input_blocks.1.0.extra.weight", "first_stage_model.bogus.weight",
                "lora_unet_down.alpha"):
        assert key in msg
    assert "bad.safetensors" in msg


def test_checkpoint_with_wrong_shape(ldm_state, tmp_path):
    state = dict(ldm_state)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    state[key] = torch.zeros(500, TINY.text.hidden_size)
    with pytest.raises(FormatError) as e:
        load_models(_save(state, tmp_path), TINY)
    msg = str(e.value)
    assert key in msg and "(500, 32)" in msg and "(1024, 32)" in msg and "wrong shape" in msg


def test_listing_is_capped(ldm_state, tmp_path):
    state = {k: v for k, v in ldm_state.items() if not k.startswith("first_stage_model.decoder.")}
    with pytest.raises(FormatError) as e:
        load_models(_save(state, tmp_path), TINY)
    assert "more)" in str(e.value) and str(e.value).count("decoder.") <= 12

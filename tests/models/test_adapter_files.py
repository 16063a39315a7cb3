"""Adapter files: pidrt layouts round trip, published layouts load, bad files are named errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pidrt.errors import FormatError
from pidrt.models.adapter_files import load_adapter, save_adapter
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter
from pidrt.models.attention import attention_layers
from pidrt.models.build import build_unet
from pidrt.models.image_proj import MLPProjModel, ImageProjModel
from pidrt.models.mapping import PIDIFF_GROUPS
from pidrt.models.presets import TINY

D = TINY.unet.cross_attention_dim


@pytest.fixture(scope="module")
def layers():
    return attention_layers(build_unet(TINY))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("residual", ["pre_out", "post_out"])
def test_sca_round_trip(tmp_path, layers, residual):
    adapter = SCAAdapter.random(layers, D, seed=1, residual=residual, groups=PIDIFF_GROUPS, layernorm=False)
    save_adapter(tmp_path / "a.safetensors", adapter)
    back = load_adapter(tmp_path / "a.safetensors", layers, D)
    assert isinstance(back, SCAAdapter) and back.residual == residual
    assert back.mapping.groups == PIDIFF_GROUPS and back.mapping.norm is None
    assert same(back.tensors(), adapter.tensors())


def test_eaa_and_ip_round_trip(tmp_path, layers):
    eaa = EAAAdapter.random(layers, latent_size=8, n_levels=4, s_c=16)
    save_adapter(tmp_path / "e.safetensors", eaa)
    back = load_adapter(tmp_path / "e.safetensors", layers, D)
    assert isinstance(back, EAAAdapter) and back.s_c == 16 and same(back.tensors(), eaa.tensors())
    ip = IPAdapterWeights.random(layers, D)
    save_adapter(tmp_path / "i.safetensors", ip)
    assert same(load_adapter(tmp_path / "i.safetensors", layers, D).tensors(), ip.tensors())


def published_ip(layers, proj) -> dict:
    """The key layout of ip-adapter_sd15 / ip-adapter-faceid files: attn2 layers numbered 1, 3, .., 31."""
    cross = [l for l in layers if l.kind == "cross"]
    assert [l.index for l in cross] == list(range(1, 32, 2))
    ip = {}
    for l in cross:
        ip[f"{l.index}.to_k_ip.weight"] = torch.randn(l.channels, D)
        ip[f"{l.index}.to_v_ip.weight"] = torch.randn(l.channels, D)
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


@pytest.mark.parametrize("proj", [ImageProjModel(D, 40, 4), MLPProjModel(D, 24, 4)], ids=["linear", "faceid_mlp"])
def test_published_ip_adapter_bin_and_safetensors(tmp_path, layers, proj):
    obj = published_ip(layers, proj)
    torch.save(obj, tmp_path / "ip-adapter.bin")
    flat = {f"{g}.{k}": v.contiguous() for g, sd in obj.items() for k, v in sd.items()}
    save_file(flat, tmp_path / "ip-adapter.safetensors")
    for name in ("ip-adapter.bin", "ip-adapter.safetensors"):
        got = load_adapter(tmp_path / name, layers, D)
        assert isinstance(got, IPAdapterWeights) and type(got.image_proj) is type(proj)
        assert same(got.tensors(), flat)


# The W+ adapter's checkpoint (csxmli2016/w-plus-adapter, w_plus_adapter/w_plus_adapter.py):
# "w_proj" is WProjModel's state dict, one bias-free Linear per group of W+ rows (proj_index
# [4, 8, 12, 18]) and a LayerNorm; "wplus_adapter" is the ModuleList of all 32 attention
# processors, of which the attn2 ones (odd indices) hold WPlusAttnProcessor's three Linears.
WPLUS_W_PROJ = {"proj_0.weight": (D, 4 * 512), "proj_1.weight": (D, 4 * 512), "proj_2.weight": (D, 4 * 512),
                "proj_3.weight": (D, 6 * 512), "norm.weight": (D,), "norm.bias": (D,)}
WPLUS_PROCESSOR = ("to_k_wplus.weight", "to_v_wplus.weight", "to_q_wplus.weight")


def test_published_wplus_adapter(tmp_path, layers):
    g = torch.Generator().manual_seed(2)
    w_proj = {k: torch.randn(*shape, generator=g) * 0.02 for k, shape in WPLUS_W_PROJ.items()}
    wplus = {}
    for layer in layers:
        if layer.index % 2:  # attn2: k, v read the D-wide tokens, q the layer's own width
            for name in WPLUS_PROCESSOR:
                cin = layer.channels if name.startswith("to_q") else D
                wplus[f"{layer.index}.{name}"] = torch.randn(layer.channels, cin, generator=g)
    torch.save({"w_proj": w_proj, "wplus_adapter": wplus}, tmp_path / "wplus_adapter.bin")
    got = load_adapter(tmp_path / "wplus_adapter.bin", layers, D)
    assert isinstance(got, SCAAdapter) and got.residual == "pre_out" and got.mapping.norm is not None
    for index, weights in got.layers.items():
        for ours in ("to_q", "to_k", "to_v"):
            assert torch.equal(weights[f"{ours}.weight"], wplus[f"{index}.{ours}_wplus.weight"])
    assert sorted(got.layers) == list(range(1, 32, 2))
    # F(w) as WProjModel.forward computes it: one token per row group, then the LayerNorm
    w = torch.randn(2, 18, 512, generator=g)
    tokens = torch.stack([w[:, a:b].flatten(1) @ w_proj[f"proj_{i}.weight"].T
                          for i, (a, b) in enumerate(((0, 4), (4, 8), (8, 12), (12, 18)))], dim=1)
    expected = torch.nn.functional.layer_norm(tokens, (D,), w_proj["norm.weight"], w_proj["norm.bias"])
    with torch.no_grad():
        torch.testing.assert_close(got.mapping(w), expected)


def test_bad_files_are_named_errors(tmp_path, layers):
    ip = IPAdapterWeights.random(layers, D).tensors()
    cases = {
        "missing": {k: v for k, v in ip.items() if k != "ip_adapter.5.to_v_ip.weight"},
        "unexpected": ip | {"ip_adapter.2.to_k_ip.weight": torch.zeros(3, 3)},
        "shape": ip | {"ip_adapter.1.to_k_ip.weight": torch.zeros(7, D)},
    }
    expected = {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "wrong shapes"}
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(FormatError, match=expected[name]) as err:
            load_adapter(path, layers, D)
        assert str(path) in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FormatError, match="junk.safetensors"):
        load_adapter(tmp_path / "junk.safetensors", layers, D)
    torch.save({"something": {}}, tmp_path / "other.bin")
    with pytest.raises(FormatError, match="match neither"):
        load_adapter(tmp_path / "other.bin", layers, D)
    with pytest.raises(FormatError, match="no such"):
        load_adapter(tmp_path / "absent.safetensors", layers, D)
    save_file({"x": torch.zeros(1)}, tmp_path / "future.safetensors", metadata={"pidrt_schema": "9", "kind": "sca"})
    with pytest.raises(FormatError, match="schema"):
        load_adapter(tmp_path / "future.safetensors", layers, D)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, layers, bad):
    ip = IPAdapterWeights.random(layers, D).tensors()
    ip["ip_adapter.3.to_v_ip.weight"] = ip["ip_adapter.3.to_v_ip.weight"].clone()
    ip["ip_adapter.3.to_v_ip.weight"][0, 1] = bad
    save_file(ip, tmp_path / "ip.safetensors")
    with pytest.raises(FormatError, match=r"'ip_adapter\.3\.to_v_ip\.weight' has non-finite") as err:
        load_adapter(tmp_path / "ip.safetensors", layers, D)
    assert "ip.safetensors" in str(err.value)
    # A published W+ adapter .bin: the message names the file's own key, not pidrt's renaming.
    ref = SCAAdapter.random(layers, D, seed=2)
    w_proj = {k[len("mapping."):]: v for k, v in ref.tensors().items() if k.startswith("mapping.")}
    wplus = {f"{i}.to_q_wplus.weight": w["to_q.weight"] for i, w in ref.layers.items()}
    wplus["1.to_q_wplus.weight"] = torch.full_like(wplus["1.to_q_wplus.weight"], bad)
    torch.save({"w_proj": w_proj, "wplus_adapter": wplus}, tmp_path / "wplus_adapter.bin")
    with pytest.raises(FormatError, match=r"'wplus_adapter\.1\.to_q_wplus\.weight' has non-finite"):
        load_adapter(tmp_path / "wplus_adapter.bin", layers, D)


def test_default_scale_metadata(tmp_path, layers):
    adapter = SCAAdapter.random(layers, D, seed=1)
    assert load_adapter(_saved(tmp_path / "plain.safetensors", adapter), layers, D).default_scale is None
    adapter.default_scale = 0.55
    assert load_adapter(_saved(tmp_path / "scaled.safetensors", adapter), layers, D).default_scale == 0.55
    eaa = EAAAdapter.random(layers, latent_size=8, n_levels=4, s_c=16)
    eaa.default_scale = 0.7
    assert load_adapter(_saved(tmp_path / "e.safetensors", eaa), layers, D).default_scale == 0.7
    tensors = IPAdapterWeights.random(layers, D).tensors()
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"kind": "ip", "default_scale": "lots"})
    with pytest.raises(FormatError, match="default_scale"):
        load_adapter(tmp_path / "bad.safetensors", layers, D)


def _saved(path, adapter):
    save_adapter(path, adapter)
    return path

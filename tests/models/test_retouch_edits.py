"""Layout-and-Retouch's swap, blend, subject maps and mask, against the equations written out here.

The oracles in this file are independent transcriptions (explicit softmax per element, OpenCV for
the distance transform and the connected sets), not calls into pidrt.models.retouch.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.models.attention import attention_layers, branch_state
from pidrt.models.build import build_unet
from pidrt.models.presets import TINY
from pidrt.models.retouch import (
    MaskConfig,
    RetouchConfig,
    SubjectMaps,
    SwapLayer,
    call_order,
    map_layers,
    swap_layers,
    token_weights,
)
from pidrt.models.retouch_mask import blend_masks, level_masks, normalise_maps, refine


@pytest.fixture(scope="module")
def unet():
    return build_unet(TINY, seed=0)


def unet_call(unet, sample, t, ctx, swap=None, maps=None):
    state = branch_state(unet)
    state.swap, state.maps = swap or {}, maps
    try:
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=ctx).sample
    finally:
        state.clear()


def test_blocks_are_numbered_in_call_order_as_masactrl_counts(unet):
    layers = attention_layers(unet)
    blocks = [layer.name.rsplit(".transformer_blocks", 1)[0] for layer in call_order(layers) if layer.kind == "self"]
    assert blocks[:7] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
                          "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
                          "mid_block.attentions.0"]
    edited = [layer.name.split(".transformer_blocks")[0] for layer in swap_layers(layers, RetouchConfig())]
    # MasaCtrl's start_layer=10 of 16: the two highest-resolution decoder blocks.
    assert edited == [f"up_blocks.{b}.attentions.{a}" for b in (2, 3) for a in range(3)]
    maps = [layer.name for layer in map_layers(layers, MaskConfig(), 4)]
    assert maps == [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2" for a in range(3)]
    both = map_layers(layers, MaskConfig(map_blocks=("down_blocks", "up_blocks")), 4)
    assert [layer.name.split(".")[0] for layer in both] == ["down_blocks"] * 2 + ["up_blocks"] * 3


def test_own_rows_and_a_full_mask_are_the_plain_unet_bit_for_bit(unet):
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([999, 500, 20])
    plain = unet_call(unet, sample, t, ctx)
    layers = swap_layers(attention_layers(unet), RetouchConfig(start_layer=0))
    own = torch.arange(3)
    # Own K/V and own output: any mask, cached slots present or not, changes nothing.
    swap = {layer.name: SwapLayer(own, own) for layer in layers}
    assert torch.equal(unet_call(unet, sample, t, ctx, swap), plain)
    swap = {}
    for layer in layers:
        n = _tokens(layer.name)
        slots = torch.randn(3, n, layer.channels, generator=g)
        swap[layer.name] = SwapLayer(own, own, torch.rand(3, n, generator=g), slots, slots, slots)
    assert torch.equal(unet_call(unet, sample, t, ctx, swap), plain)
    # A mask of ones keeps the own output whatever the other source is.
    swap = {layer.name: SwapLayer(own, torch.tensor([1, 2, 0]), torch.ones(3, _tokens(layer.name))) for layer in layers}
    assert torch.equal(unet_call(unet, sample, t, ctx, swap), plain)
    # Recording maps computes them apart: the output is untouched.
    names = frozenset(layer.name for layer in attention_layers(unet) if layer.kind == "cross")
    maps = SubjectMaps(token_weights([[1], [2, 3], [4]], 77), names)
    assert torch.equal(unet_call(unet, sample, t, ctx, maps=maps), plain)
    assert set(maps.maps) == names


def _tokens(name: str) -> int:
    from pidrt.models.adapters import layer_tokens

    return layer_tokens(name, 8, 4)


def test_swap_and_blend_match_the_equations_on_one_layer(unet):
    """out_b = m * to_out(softmax(q_b k_s^T / sqrt d) v_s) + (1 - m) * O_o, per element, written out."""
    layer = swap_layers(attention_layers(unet), RetouchConfig())[0]
    attn = dict(unet.named_modules())[layer.name]
    proc = attn.processor
    g = torch.Generator().manual_seed(3)
    b, n, c = 4, 16, layer.channels
    x = torch.randn(b, n, c, generator=g)
    slot_k, slot_v, slot_o = (torch.randn(b, n, c, generator=g) for _ in range(3))
    kv_source = torch.tensor([0, 0, 1, 4 + 3])  # own, row 0, row 1, element 3's slot
    out_source = torch.tensor([0, 2, 4 + 2, 1])  # own, row 2, element 2's slot, row 1
    mask = torch.rand(b, n, generator=g)
    edit = SwapLayer(kv_source, out_source, mask, slot_k, slot_v, slot_o)
    state = branch_state(unet)
    state.swap = {layer.name: edit}
    try:
        with torch.no_grad():
            got = proc(attn, x)
            state.swap = {}
            plain = proc(attn, x)
    finally:
        state.clear()
    heads, d = attn.heads, c // attn.heads

    def attention(q_in, k, v):
        q = attn.to_q(q_in).view(n, heads, d).transpose(0, 1)
        k, v = k.view(n, heads, d).transpose(0, 1), v.view(n, heads, d).transpose(0, 1)
        p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        return attn.to_out[0]((p @ v).transpose(0, 1).reshape(n, c))

    with torch.no_grad():
        keys = [attn.to_k(x[i]) for i in range(b)] + list(slot_k)
        values = [attn.to_v(x[i]) for i in range(b)] + list(slot_v)
        own = [attention(x[i], keys[int(kv_source[i])], values[int(kv_source[i])]) for i in range(b)]
        bank = own + list(slot_o)  # each row's (swapped) output, then the slots
        want = torch.stack([mask[i, :, None] * own[i] + (1 - mask[i, :, None]) * bank[int(out_source[i])]
                            for i in range(b)])
    assert (got - want).abs().max() < 1e-5
    assert (got[0] - plain[0]).abs().max() < 1e-5  # element 0: own K/V, own output


def test_mask_of_zeros_takes_the_other_output(unet):
    layer = swap_layers(attention_layers(unet), RetouchConfig())[0]
    attn = dict(unet.named_modules())[layer.name]
    x = torch.randn(2, 16, layer.channels, generator=torch.Generator().manual_seed(4))
    swap_rows = torch.tensor([1, 0])
    state = branch_state(unet)
    try:
        with torch.no_grad():
            state.swap = {layer.name: SwapLayer(torch.arange(2), swap_rows, torch.zeros(2, 16))}
            got = attn.processor(attn, x)
            state.swap = {}
            plain = attn.processor(attn, x)
    finally:
        state.clear()
    assert (got - plain[swap_rows]).abs().max() < 1e-6


def test_subject_map_is_the_head_averaged_probability_of_the_tokens(unet):
    layer = next(layer for layer in attention_layers(unet) if layer.kind == "cross")
    attn = dict(unet.named_modules())[layer.name]
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 16, layer.channels, generator=g), torch.randn(2, 77, 32, generator=g)
    maps = SubjectMaps(token_weights([[2], [3, 5]], 77), frozenset([layer.name]))
    state = branch_state(unet)
    state.maps = maps
    try:
        with torch.no_grad():
            attn.processor(attn, x, ctx)
    finally:
        state.clear()
    heads, d = attn.heads, layer.channels // attn.heads
    with torch.no_grad():
        q = attn.to_q(x).view(2, 16, heads, d).transpose(1, 2)
        k = attn.to_k(ctx).view(2, 77, heads, d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean(1)
    want = torch.stack([p[0, :, 2], p[1, :, 3] + p[1, :, 5]])
    assert (maps.maps[layer.name] - want).abs().max() < 1e-6
    with pytest.raises(PidrtError, match="1..76"):
        token_weights([[0]], 77)


# ---- the mask rule, against OpenCV ------------------------------------------------------------

def oracle_mask(ca: np.ndarray, user: np.ndarray | None, min_component: float) -> np.ndarray:
    """The rule as docs/retouch.md writes it, with OpenCV's exact L2 distance and 8-connected labels."""
    if user is None:
        m = ca.astype(np.float32)
    else:
        u = user.astype(np.uint8)
        if u.all():
            dist_w = np.ones(u.shape, np.float32)
        elif not u.any():
            dist_w = np.zeros(u.shape, np.float32)
        else:
            dist = cv2.distanceTransform(u, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            inside = dist[u > 0]
            lo, hi = inside.min(), inside.max()
            dist_w = np.where(u > 0, 1.0 if hi == lo else 0.5 + 0.5 * (dist - lo) / (hi - lo), 0.0)
        m = np.maximum(dist_w, ((ca > 0) & (u > 0)).astype(np.float32)).astype(np.float32)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((m > 0).astype(np.uint8), connectivity=8)
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] < min_component * m.size:
            m[labels == label] = 0
    return m


def synthetic(seed: int, side: int = 24):
    rng = np.random.default_rng(seed)
    user = np.zeros((side, side), bool)
    user[4:18, 5:20] = True
    user[20:22, 1:3] = True  # a 4-pixel speck
    ca = np.zeros((side, side), bool)
    ca[6:12, 8:14] = True
    ca[0, side - 1] = True  # a 1-pixel speck outside U
    ca |= rng.random((side, side)) > 0.97
    return ca, user


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_user", [True, False])
def test_refinement_matches_opencv(seed, with_user):
    ca, user = synthetic(seed)
    got = refine(ca, user if with_user else None, min_component=0.01)
    want = oracle_mask(ca, user if with_user else None, 0.01)
    assert np.abs(got - want).max() < 1e-6
    if with_user:
        assert got[20, 1] == 0 and got[0, 23] == 0  # both specks removed (4 and 1 < 5.76 pixels)
        assert got[8, 10] == 1.0  # confident: M_ca inside U
        assert 0.5 <= got[user & ~ca & (got > 0)].min() and got[~user].max() == 0


def test_distance_weights_span_half_to_one():
    user = np.zeros((9, 9), bool)
    user[1:8, 1:8] = True
    got = refine(np.zeros_like(user), user, 0.0)
    assert got[user].min() == pytest.approx(0.5) and got[4, 4] == pytest.approx(1.0) and got[~user].max() == 0


def test_edge_masks():
    ones, zeros = np.ones((8, 8), bool), np.zeros((8, 8), bool)
    assert (refine(zeros, ones, 0.01) == 1).all()  # a user mask without background: weight 1
    assert (refine(ones, zeros, 0.01) == 0).all()  # an empty user mask discards M_ca
    assert (refine(ones, None, 0.01) == 1).all() and (refine(zeros, None, 0.01) == 0).all()
    # Constant maps have no foreground; normalised maps span [0, 1].
    assert (normalise_maps(torch.full((2, 4, 4), 0.3)) == 0).all()
    maps = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    m = normalise_maps(maps.view(2, 4, 4)).flatten(1)
    assert (m.min(1).values == 0).all() and (m.max(1).values == 1).all()


def test_blend_masks_threshold_resize_and_pool():
    maps = torch.zeros(1, 4)
    maps[0, 0] = 1.0  # one hot cell of a 2x2 map
    (m,) = blend_masks(maps, (2, 2), (8, 8), MaskConfig(threshold=0.5, min_component=0.0))
    want = torch.zeros(8, 8)
    want[:4, :4] = 1
    assert torch.equal(m, want)
    user = torch.zeros(16, 16)
    user[:8, :] = 1
    (m,) = blend_masks(maps, (2, 2), (8, 8), MaskConfig(threshold=0.5, min_component=0.0), [user])
    assert m.shape == (16, 16) and (m[:8, :8] == 1).all() and (m[8:] == 0).all()
    pooled = level_masks([want, want], {16: (4, 4), 4: (2, 2)})
    assert pooled[16].shape == (2, 16) and pooled[4][0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_config_checks():
    RetouchConfig().check(50)
    for bad, match in ((RetouchConfig(swap_start=6, reference_start=5), "must not come before"),
                       (RetouchConfig(layout_steps=51), "layout_steps"),
                       (RetouchConfig(blend_start=0), "blend_start"),
                       (RetouchConfig(start_layer=12, end_layer=12), "start_layer"),
                       (RetouchConfig(mask=MaskConfig(threshold=2.0)), "threshold"),
                       (RetouchConfig(mask=MaskConfig(map_blocks=("middle",))), "map_blocks")):
        with pytest.raises(PidrtError, match=match):
            bad.check(50)

"""The dual-KV attention kernel against two torch SDPA calls (pidrt.kernels.reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pidrt.errors import PidrtError
from pidrt.kernels.dual_kv import dual_kv_attention, dual_kv_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make(bsz, heads, tokens, m1, m2, d, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return (rnd(bsz, heads, tokens, d), rnd(bsz, heads, m1, d), rnd(bsz, heads, m1, d),
            rnd(bsz, heads, m2, d), rnd(bsz, heads, m2, d))


def reference(tensors, sigma):
    return dual_kv_reference(*(t.float() for t in tensors), sigma.float())


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


SHAPES = [  # (B, H, N, M1, M2, d): odd N, M2 != M1, padded head dims 40 -> 64 and 80 -> 128
    (2, 2, 37, 37, 50, 40),
    (2, 2, 37, 77, 45, 80),
    (1, 3, 20, 20, 20, 64),
    (2, 1, 130, 19, 33, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-N{}-M{}-{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, dtype, device):
    bsz, heads, tokens, m1, m2, d = shape
    tensors = make(bsz, heads, tokens, m1, m2, d, device, dtype)
    sigma = torch.tensor([0.8, 0.0][:bsz], device=device)  # mixes 0 and nonzero
    out = torch.full_like(tensors[0], float("nan"))  # poisoned: every element must be written
    got = dual_kv_attention(*tensors, sigma, out=out)
    assert got is out
    check(out, reference(tensors, sigma), dtype)


def test_sigma_zero_is_single_attention_and_skips_second_set(device):
    q, k1, v1, k2, v2 = make(2, 2, 37, 37, 50, 40, device)
    k2[0], v2[0] = float("nan"), float("nan")  # element 0 has sigma 0: set 2 must never be read
    out = dual_kv_attention(q, k1, v1, k2, v2, torch.tensor([0.0, 1.0], device=device))
    single = F.scaled_dot_product_attention(q[:1], k1[:1], v1[:1])
    check(out[:1], single, torch.float32)
    out0 = dual_kv_attention(q, k1, v1, k2, v2, 0.0)
    check(out0, F.scaled_dot_product_attention(q, k1, v1), torch.float32)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 64)])
def test_block_sizes_and_online_rescaling(block_m, block_n, device):
    """Many KV blocks with a spread of logits exercise the running-max rescaling of both states."""
    tensors = make(2, 2, 45, 70, 33, 40, device)
    tensors = (tensors[0] * 3,) + tensors[1:]
    sigma = torch.tensor([-0.6, 1.5], device=device)
    out = dual_kv_attention(*tensors, sigma, block_m=block_m, block_n=block_n,
                            out=torch.full_like(tensors[0], float("nan")))
    check(out, reference(tensors, sigma), torch.float32)


def test_strided_layout_scale_and_head_dim_160(device):
    """[B, N, H, d] storage seen through permute (as a UNet's attention holds it), d = 160 -> 256."""
    bsz, heads, tokens, d = 1, 2, 19, 160
    g = torch.Generator().manual_seed(1)
    bnhd = [torch.randn(bsz, m, heads, d, generator=g).to(device) for m in (tokens, 23, 23, 11, 11)]
    tensors = [t.permute(0, 2, 1, 3) for t in bnhd]
    out_store = torch.full((bsz, tokens, heads, d), float("nan"), device=device)
    dual_kv_attention(*tensors, 0.7, sm_scale=0.05, out=out_store.permute(0, 2, 1, 3))
    ref = dual_kv_reference(*tensors, 0.7, sm_scale=0.05)
    check(out_store.permute(0, 2, 1, 3), ref, torch.float32)


def test_errors(device):
    q, k1, v1, k2, v2 = make(2, 2, 9, 9, 5, 16, device)
    sigma = torch.ones(2, device=device)
    with pytest.raises(PidrtError, match="4 dims"):
        dual_kv_attention(q[0], k1, v1, k2, v2, sigma)
    with pytest.raises(PidrtError, match="v1"):
        dual_kv_attention(q, k1, v1[:, :, :4], k2, v2, sigma)
    with pytest.raises(PidrtError, match="k2"):
        dual_kv_attention(q, k1, v1, k2[..., :8], v2, sigma)
    with pytest.raises(PidrtError, match="dtype mismatch"):
        dual_kv_attention(q.half(), k1, v1, k2, v2, sigma)
    with pytest.raises(PidrtError, match="sigma"):
        dual_kv_attention(q, k1, v1, k2, v2, torch.ones(3, device=device))
    with pytest.raises(PidrtError, match="one device"):
        dual_kv_attention(q, k1.to("meta"), v1, k2, v2, sigma)
    with pytest.raises(PidrtError, match="at least one token"):
        dual_kv_attention(q, k1, v1, k2[:, :, :0], v2[:, :, :0], sigma)
    with pytest.raises(PidrtError, match="head dim"):
        big = torch.zeros(2, 2, 9, 300, device=device)
        dual_kv_attention(big, big, big, big, big, sigma)
    with pytest.raises(PidrtError, match="out"):
        dual_kv_attention(q, k1, v1, k2, v2, sigma, out=torch.empty(2, 2, 9, 8, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,d,m2", [(4096, 40, 4096), (1024, 80, 256), (256, 160, 512), (4096, 40, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd15_shapes_gpu(tokens, d, m2, dtype):
    tensors = make(2, 8, tokens, tokens if m2 == tokens else 77, m2, d, "cuda", dtype)
    sigma = torch.tensor([0.8, 0.0], device="cuda")
    out = dual_kv_attention(*tensors, sigma, out=torch.full_like(tensors[0], float("nan")))
    check(out, reference(tensors, sigma), dtype)

"""The fused few-token kernel against pidrt.models.folded.apply_folded (the models' own op)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.kernels import available
from pidrt.kernels.few_token import few_token_branch
from pidrt.models.folded import FoldedBranch, apply_folded

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make(bsz, tokens, c_in, heads, n, device, dtype=torch.float32, c_out=None, seed=0):
    """Random inputs at the magnitudes of a real folded branch (scores O(1), outputs O(1))."""
    g = torch.Generator().manual_seed(seed)
    c_out = c_out or c_in
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, base = rnd(bsz, tokens, c_in), rnd(bsz, tokens, c_out)
    branch = FoldedBranch(
        rnd(bsz, c_in, heads * n) * 2 / c_in**0.5,
        rnd(bsz, heads * n, c_out) / heads**0.5,
        rnd(bsz, heads * n),
        rnd(bsz, c_out) * 0.1,
        n,
    )
    return base.to(device, dtype), x.to(device, dtype), branch.to(device, dtype)


def reference(base, x, branch, scale):
    """apply_folded in fp32 (the kernel accumulates in fp32, so compare with the exact value)."""
    f32 = branch.to(dtype=torch.float32)
    return apply_folded(base.float(), x.float(), f32, scale.float())


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


SHAPES = [  # (B, N, C, H, n): odd N, groups of 1/3/4/16, C not a multiple of the K block
    (2, 37, 32, 8, 4),
    (2, 37, 48, 8, 1),
    (1, 20, 64, 8, 16),
    (3, 9, 32, 2, 3),
    (2, 70, 64, 8, 4),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-C{}-H{}-n{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, dtype, device):
    bsz, tokens, c, heads, n = shape
    base, x, branch = make(bsz, tokens, c, heads, n, device, dtype)
    scale = torch.tensor([0.7, 0.0, -1.3][:bsz], device=device)  # mixes 0 and nonzero
    out = torch.full_like(base, float("nan"))  # poisoned: every element must be written
    got = few_token_branch(base, x, branch, scale, out=out)
    assert got is out
    check(out, reference(base, x, branch, scale), dtype)


def test_scale_zero_skips_branch_and_copies_base(device):
    base, x, branch = make(2, 37, 32, 8, 4, device)
    branch.a[1] = float("nan")  # batch element 1 has scale 0: its branch must never be read
    out = few_token_branch(base, x, branch, torch.tensor([0.5, 0.0], device=device),
                           out=torch.full_like(base, float("nan")))
    assert torch.equal(out[1], base[1])
    ref = apply_folded(base[:1], x[:1], FoldedBranch(branch.a[:1], branch.b[:1], branch.score_bias[:1],
                                                     branch.out_bias[:1], 4), torch.tensor([0.5]))
    check(out[:1], ref, torch.float32)
    allzero = few_token_branch(base, x, branch, 0.0)
    assert torch.equal(allzero, base)


@pytest.mark.parametrize("block_c,split_c", [(16, 1), (16, 2), (32, 3), (64, 1)])
def test_column_chunks_and_splits(block_c, split_c, device):
    """Several output chunks per program and several programs per token tile."""
    base, x, branch = make(2, 37, 64, 8, 4, device, c_out=80)  # C_out != C_in, 80 = 5 x 16
    scale = torch.tensor([1.0, 0.0], device=device)
    out = few_token_branch(base, x, branch, scale, out=torch.full_like(base, float("nan")),
                           block_n=16, block_k=16, block_c=block_c, split_c=split_c)
    check(out, reference(base, x, branch, scale), torch.float32)


def test_in_place_strided_and_broadcast(device):
    """out=base in place; x a non-contiguous view; one identity shared by the batch; float scale."""
    base, x, branch = make(3, 21, 32, 4, 4, device)
    shared = FoldedBranch(branch.a[:1], branch.b[:1], branch.score_bias[:1], branch.out_bias[:1], 4)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (N*C, 1, N)
    expanded = FoldedBranch(*(t.expand(3, *t.shape[1:]) for t in (shared.a, shared.b, shared.score_bias,
                                                                   shared.out_bias)), 4)
    ref = reference(base, x, expanded, torch.full((3,), 0.4))
    base_copy = base.clone()
    got = few_token_branch(base_copy, x_t, shared, 0.4, out=base_copy)
    assert got.data_ptr() == base_copy.data_ptr()
    check(base_copy, ref, torch.float32)
    # fp32 branch tensors with an fp16 activation are cast like apply_folded does.
    out16 = few_token_branch(base.half(), x.half(), branch, torch.tensor(0.4, device=device))
    check(out16, reference(base, x, branch, torch.full((3,), 0.4)), torch.float16)


def test_errors(device, monkeypatch):
    base, x, branch = make(2, 9, 32, 8, 4, device)
    scale = torch.ones(2, device=device)
    with pytest.raises(PidrtError, match="3 dims"):
        few_token_branch(base, x[0], branch, scale)
    with pytest.raises(PidrtError, match="batch or token"):
        few_token_branch(base[:, :5], x, branch, scale)
    with pytest.raises(PidrtError, match="branch.a"):
        few_token_branch(base, x[..., :16], branch, scale)
    with pytest.raises(PidrtError, match="branch.b"):
        few_token_branch(base[..., :16], x, branch, scale)
    with pytest.raises(PidrtError, match="dtype mismatch"):
        few_token_branch(base.half(), x, branch, scale)
    with pytest.raises(PidrtError, match="scale"):
        few_token_branch(base, x, branch, torch.ones(3, device=device))
    with pytest.raises(PidrtError, match="out"):
        few_token_branch(base, x, branch, scale, out=torch.empty(2, 9, 16, device=device))
    with pytest.raises(PidrtError, match="one device"):
        few_token_branch(base, x.to("meta"), branch, scale)
    with pytest.raises(PidrtError, match="power of two"):
        few_token_branch(base, x, branch, scale, block_c=48)
    if device == "cpu":
        with pytest.raises(PidrtError, match="bfloat16"):
            few_token_branch(base.bfloat16(), x.bfloat16(), branch, scale)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(PidrtError, match="CUDA"):
            few_token_branch(base, x, branch, scale)


def test_package_import_is_light():
    code = "import sys, pidrt.kernels as k; print('triton' in sys.modules); print(k.available()[0])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert res.stdout.split() == ["False", "True"]
    ok, why = available()
    assert ok and why


@pytest.mark.gpu
@pytest.mark.parametrize("c,tokens", [(320, 4096), (640, 1024), (1280, 256), (1280, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd15_shapes_gpu(c, tokens, dtype):
    base, x, branch = make(2, tokens, c, 8, 4, "cuda", dtype)
    scale = torch.tensor([0.4, 0.0], device="cuda")
    out = few_token_branch(base, x, branch, scale, out=torch.full_like(base, float("nan")))
    check(out, reference(base, x, branch, scale), dtype)

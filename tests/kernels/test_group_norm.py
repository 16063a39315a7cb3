"""The fused GroupNorm(+shift, +SiLU) kernel against F.group_norm in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.kernels.group_norm import _group_block, group_norm
from pidrt.kernels.reference import group_norm_reference

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}

SHAPES = [  # (B, C, H, W, groups): odd pixel counts, cpg 8/10/3/80/300, fewer groups than a block holds
    (2, 32, 5, 7, 4),
    (1, 40, 3, 3, 4),
    (2, 96, 9, 9, 32),
    (2, 320, 8, 8, 32),
    (1, 160, 4, 4, 2),
    (1, 600, 2, 2, 2),
    (1, 8, 3, 5, 8),
]


def make(shape, device, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    bsz, c, h, w, _ = shape
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(bsz, c, h, w) * 2 + offset
    return x.to(device, dtype), rnd(c).to(device, dtype), rnd(c).to(device, dtype), rnd(bsz, c).to(device, dtype)


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-{}x{}-G{}".format(*s))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, layout, dtype, device):
    x, w, b, shift = make(shape, device, dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    group_norm(x, w, b, shape[4], shift=shift, silu=True, out=out, block_hw=16)
    ref = group_norm_reference(x.float(), w.float(), b.float(), shape[4], shift=shift.float(), silu=True)
    check(out, ref, dtype)
    assert out.stride() == x.stride()


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_shift", [False, True])
def test_every_optional_part(silu, affine, with_shift, device):
    shape = (2, 64, 6, 6, 8)
    x, w, b, shift = make(shape, device, torch.float32, seed=1)
    w, b = (w, b) if affine else (None, None)
    shift = shift if with_shift else None
    out = group_norm(x, w, b, 8, 1e-6, shift=shift, silu=silu)
    check(out, group_norm_reference(x, w, b, 8, 1e-6, shift=shift, silu=silu), torch.float32)


def test_many_chunks_and_a_large_mean(device):
    # 1089 pixels in chunks of 16: 69 partials merged in three passes of the merge loop; a mean of
    # 300 against unit spread is where E[x^2] - E[x]^2 would lose the variance in fp32.
    shape = (1, 48, 33, 33, 8)
    x, w, b, shift = make(shape, device, torch.float32, seed=2, offset=300.0)
    out = group_norm(x.contiguous(memory_format=torch.channels_last), w, b, 8, shift=shift, block_hw=16)
    ref = group_norm_reference(x.double(), w.double(), b.double(), 8, shift=shift.double()).float()
    # fp32 inputs near 300 carry ~2e-5 absolute error themselves; the one-pass formula would be
    # off by ~3e-3 here.
    err = (out - ref).abs().max().item()
    assert err < 1e-4, err


def test_apply_programs_taking_several_chunks(device):
    shape = (2, 40, 10, 10, 4)
    x, w, b, _ = make(shape, device, torch.float32, seed=3)
    ref = group_norm_reference(x, w, b, 4, silu=True)
    for tiles in (1, 3, 7, 100):  # 7 chunks of 16 pixels: uneven splits and one program for all
        check(group_norm(x, w, b, 4, silu=True, block_hw=16, tiles=tiles), ref, torch.float32)


def test_shift_as_a_time_embedding_column(device):
    shape = (2, 32, 4, 4, 4)
    x, w, b, shift = make(shape, device, torch.float32, seed=4)
    out = group_norm(x, w, b, 4, shift=shift[:, :, None, None])
    check(out, group_norm_reference(x, w, b, 4, shift=shift), torch.float32)


def test_other_strides_are_made_contiguous(device):
    shape = (2, 32, 6, 5, 4)
    x, w, b, _ = make(shape, device, torch.float32, seed=5)
    view = x.transpose(2, 3)  # neither NCHW- nor NHWC-contiguous
    out = group_norm(view, w, b, 4)
    check(out, group_norm_reference(view.contiguous(), w, b, 4), torch.float32)


@pytest.mark.parametrize("cpg", [1, 10, 20, 30, 40, 80, 300])
def test_programs_take_whole_groups_padded_to_a_power_of_two(cpg):
    # the properties the kernel's masks rely on; how many lanes a program gets is the tile choice
    # (_group_block's docstring), which the numerical tests above run through
    groups, padded = _group_block(cpg)
    assert padded >= cpg and padded & (padded - 1) == 0 and (padded == 1 or padded < 2 * cpg)
    assert groups >= 1 and groups & (groups - 1) == 0


def test_bad_input_is_refused_clearly(device):
    x, w, b, shift = make((2, 32, 4, 4, 4), device, torch.float32)
    with pytest.raises(PidrtError, match="divisor"):
        group_norm(x, w, b, 5)
    with pytest.raises(PidrtError, match="4 dims"):
        group_norm(x[0], w, b, 4)
    with pytest.raises(PidrtError, match=r"weight must be a \[32\] float tensor"):
        group_norm(x, w[:16], b, 4)
    with pytest.raises(PidrtError, match="bias must be a"):
        group_norm(x, w, b.long(), 4)
    with pytest.raises(PidrtError, match="shift must be"):
        group_norm(x, w, b, 4, shift=shift[:1])
    with pytest.raises(PidrtError, match="unsupported dtype"):
        group_norm(x.double(), w, b, 4)
    with pytest.raises(PidrtError, match="layout"):
        group_norm(x, w, b, 4, out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(PidrtError, match="block_hw"):
        group_norm(x, w, b, 4, block_hw=24)


COMPILE_SCRIPT = """
import json, sys, torch
from pidrt.kernels import group_norm as gn
from pidrt.kernels.catalog import ptxas_report

rows = []
# 8 groups of 16 lanes (320 channels) and one group of 128 (2560), in both layouts, with the time
# embedding's shift and SiLU (ResNet norm2) and with neither (transformer input norm).
for c, hw, layout, shift, silu in [(320, 4096, "NHWC", True, True), (320, 4096, "NHWC", False, False),
                                   (2560, 64, "NHWC", True, True), (320, 4096, "NCHW", True, True),
                                   (2560, 64, "NCHW", False, True)]:
    x = torch.empty(2, c, hw // 64, 64, dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "NHWC" else x
    w = torch.empty(c, dtype=torch.float16)
    # The launches group_norm makes, specialised as Triton's JIT does (unit strides fixed, sizes and
    # strides divisible by 16 hinted): without those hints the NCHW apply kernel spills.
    for call in gn.jit_calls(x, w, w, 32, 1e-5, torch.empty(2, c, dtype=torch.float16) if shift else None, silu,
                             torch.empty_like(x), sms=132):
        done = call.compile(90)
        rows.append({"name": call.kernel.__name__, **ptxas_report(done.ptx, 90), "shared": done.shared_bytes})
json.dump(rows, sys.stdout)
"""


def test_both_kernels_compile_for_hopper_without_spills():
    # benchmarks/results/kernel-resources-sm90-triton3.6-*.md: every fused norm of the SD1.5 UNet
    # under the GPU machine's Triton; here both layouts and both ends of the group width, with
    # the installed one.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == ["_group_norm_stats_kernel", "_group_norm_apply_kernel"] * 5
    assert all(r["spill_store_bytes"] == 0 and r["shared"] <= 48 * 1024 for r in rows), rows
    assert all(r["registers"] <= 128 for r in rows), rows  # see num_warps


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64, 32), (2, 1920, 16, 16, 32), (2, 2560, 8, 8, 32)],
                         ids=lambda s: "B{}-C{}-{}x{}".format(*s[:4]))
def test_sd15_shapes_on_gpu(shape, dtype):
    x, w, b, shift = make(shape, "cuda", dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    out = group_norm(x, w, b, 32, shift=shift, silu=True)
    ref = group_norm_reference(x, w, b, 32, shift=shift, silu=True)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]

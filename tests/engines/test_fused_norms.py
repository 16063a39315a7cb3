"""Swapping diffusers' GroupNorm blocks for the fused kernel (interpreter on CPU, compiled on a
GPU: the `device` fixture), against the originals."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from pidrt.engines.fused_norms import FusedResnetBlock, fuse_group_norms, resnet_fusable


def block(**kw) -> ResnetBlock2D:
    torch.manual_seed(0)
    b = ResnetBlock2D(**{"in_channels": 32, "out_channels": 64, "temb_channels": 16, "groups": 8, **kw}).eval()
    for p in b.parameters():  # GroupNorm starts at weight 1, bias 0: make the affine part count
        p.data.normal_(0, 0.5)
    return b


@pytest.mark.usefixtures("ieee_fp32")
@pytest.mark.parametrize("with_temb", [True, False])
def test_resnet_block_matches_diffusers(with_temb, device):
    original = (block() if with_temb else block(temb_channels=None)).to(device)
    fused = FusedResnetBlock(copy.deepcopy(original))
    x = torch.randn(2, 32, 6, 5, device=device).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 16, device=device) if with_temb else None
    with torch.no_grad():
        assert (fused(x, temb) - original(x, temb)).abs().max() < 1e-4
    assert fused.state_dict().keys() == original.state_dict().keys()


def test_unfusable_blocks_are_left_and_reported():
    assert resnet_fusable(block()) is None
    assert "resamples" in resnet_fusable(block(up=True))
    assert "plain add" in resnet_fusable(block(time_embedding_norm="scale_shift"))
    assert "not SiLU" in resnet_fusable(block(non_linearity="mish"))

    net = nn.Module()
    net.blocks = nn.ModuleList([block(), block(down=True)])
    net.extra = nn.GroupNorm(4, 32)
    report = fuse_group_norms(net)
    assert isinstance(net.blocks[0], FusedResnetBlock) and isinstance(net.blocks[1], ResnetBlock2D)
    assert report.resnets == 1 and not report.out_norm
    assert report.left == {"blocks.1": "resamples",
                           "extra": "not in a ResNet block, transformer input or the output norm"}

"""Checks that a dictionary of tensors has exactly the keys and shapes a layout expects.

Every loader reports all differences at once (missing, unexpected, wrong shape), naming where
the tensors came from, rather than failing on the first key deep inside torch.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from pidrt.errors import FormatError


def check_state(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: file {tuple(got[k].shape)} != expected {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or shapes:
        parts = [f"{where}: the tensors do not fit the expected layout"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {shapes[:10]}")
        raise FormatError("; ".join(parts))


def strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    check_state({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, where)
    module.load_state_dict(dict(state))

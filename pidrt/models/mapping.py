"""SCA's mapping network F: a W+ code (18 x 512) to n visual tokens (methods.md section 1).

Layer i maps one group of W+ rows, flattened, to one token. The grouping is data read from the
adapter file because the two sources disagree (PIDiff: rows 1-5, 6-9, 10-13, 14-18; the public
W+ adapter: 1-4, 5-8, 9-12, 13-18 plus a LayerNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from pidrt.errors import PidrtError

W_ROWS, W_DIM = 18, 512
PIDIFF_GROUPS: tuple[tuple[int, int], ...] = ((0, 5), (5, 9), (9, 13), (13, 18))
WPLUS_GROUPS: tuple[tuple[int, int], ...] = ((0, 4), (4, 8), (8, 12), (12, 18))


def check_groups(groups) -> tuple[tuple[int, int], ...]:
    groups = tuple((int(a), int(b)) for a, b in groups)
    ends = [0] + [b for _, b in groups]
    if not groups or any(a != e or b <= a for (a, b), e in zip(groups, ends)) or ends[-1] != W_ROWS:
        raise PidrtError(f"W+ row groups {groups} must be consecutive, non-empty and cover rows 0..{W_ROWS}")
    return groups


class MappingNetwork(nn.Module):
    """F(w): one linear layer per row group (`proj_<i>`, as the W+ adapter names them), then an optional LayerNorm."""

    def __init__(self, groups=WPLUS_GROUPS, token_dim: int = 768, layernorm: bool = True, bias: bool = False):
        super().__init__()
        self.groups = check_groups(groups)
        for i, (a, b) in enumerate(self.groups):
            self.add_module(f"proj_{i}", nn.Linear(W_DIM * (b - a), token_dim, bias=bias))
        self.norm = nn.LayerNorm(token_dim) if layernorm else None

    @property
    def n_tokens(self) -> int:
        return len(self.groups)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """[B, 18, 512] -> [B, n, token_dim]."""
        if w.shape[-2:] != (W_ROWS, W_DIM):
            raise PidrtError(f"a W+ code is {W_ROWS}x{W_DIM}; got shape {tuple(w.shape)}")
        tokens = [getattr(self, f"proj_{i}")(w[:, a:b].flatten(1)) for i, (a, b) in enumerate(self.groups)]
        out = torch.stack(tokens, dim=1)
        return self.norm(out) if self.norm is not None else out

    def unconditional(self, batch: int = 1) -> torch.Tensor:
        """F(0): the tokens classifier-free guidance's unconditional branch sees."""
        p = next(self.parameters())
        return self(torch.zeros(batch, W_ROWS, W_DIM, dtype=p.dtype, device=p.device))

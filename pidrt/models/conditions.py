"""What a generation needs of an identity, per method, and how a scale changes over the steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from pidrt.errors import PidrtError
from pidrt.models.branches import IPIdentity, SCAIdentity
from pidrt.models.folded import FoldedBranch

StepKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FewTokenCondition:
    """SCA or IP-Adapter: the tokens for the prompt half and for CFG's negative half.

    SCA's negative half uses F(0), IP-Adapter's the projection of a zero embedding, as the
    reference implementations do.
    """

    method: str  # "sca" | "ip"
    cond: SCAIdentity | IPIdentity
    uncond: SCAIdentity | IPIdentity


@dataclass
class FoldedCondition:
    """SCA or IP-Adapter already folded (the identity artifact): per cross layer name, the
    FoldedBranch of one element ([1, ...] tensors) for the prompt and the negative half.

    Generation from it needs neither the adapter nor the tokens: the layers read A and B.
    """

    method: str  # "sca" | "ip"
    query: str  # "z" (SCA) | "x" (IP-Adapter)
    cond: dict[str, FoldedBranch]
    uncond: dict[str, FoldedBranch]


@dataclass
class EAACondition:
    """EAA: the projected identity K/V of every step and layer (cached inversion features).

    Valid only for the DDIM schedule, step count and resolution they were recorded with; the
    pipeline checks the scheduler and step count, the store keys the rest. `latents_t` (P_T of
    each reference), `caption` and `adapter` let the `recompute` placement rebuild the features
    on the fly instead (the reference branch rides in the generation's UNet batch).
    """

    steps: list[StepKV]
    latents_t: torch.Tensor | None = None  # [R, 4, h, w]
    caption: str = ""
    adapter: object | None = None  # EAAAdapter; object to keep this module free of model imports
    method: str = "eaa"


Condition = Union[FewTokenCondition, FoldedCondition, EAACondition]


@dataclass(frozen=True)
class ScaleSchedule:
    """The branch scale (lambda or sigma) on steps [start, end), 0 elsewhere.

    start = k is the layout paper's step-blended denoising: the base model lays out the image
    for the first k steps, the identity branch shapes it after.
    """

    scale: float = 1.0
    start: int = 0
    end: int | None = None

    def __post_init__(self):
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise PidrtError(f"scale schedule needs 0 <= start <= end; got start={self.start}, end={self.end}")

    def at(self, step: int) -> float:
        end = self.end if self.end is not None else step + 1
        return self.scale if self.start <= step < end else 0.0

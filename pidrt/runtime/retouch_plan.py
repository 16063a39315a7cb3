"""Stage 2's batch: which rows hold which path, and each step's swap and blend instructions.

One UNet call per step carries, for every image, the paths that ride in the batch (the layout
path when it is denoised from the inverted layout image, the reference path when it is
recomputed from P_T) and the target's rows (CFG's negative half first). A path served from
memory instead (the layout path recorded in stage 1, the reference path's cached K/V) costs no
row: each target row reads it from its own cached slot (`SwapLayer` index B + row).
`RowPlan.swap` turns a step into the `SwapLayer` of every edited layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pidrt.models.retouch import RetouchConfig, SwapLayer

# step -> layer name -> tensor [E, N, C] (E memory entries), or (K, V) of them
Memory = Callable[[int], dict]


@dataclass
class PathSource:
    """One path for every image: its batch rows, or its memory and which entry each target row reads.

    rows: per image, the path's row in the batch. Otherwise kv (and, for the layout path,
    outputs) give per step the memory, and entries[image][k] the entry target row k of the
    image reads (the recorded layout: stage 1's row of that CFG half; the reference: its image).
    """

    rows: list[int] | None = None
    kv: Memory | None = None
    outputs: Memory | None = None
    entries: list[list[int]] | None = None


@dataclass
class RowPlan:
    """The rows of a stage-2 call and the edits each step makes to its target rows."""

    batch: int
    targets: list[list[int]]  # per image, its target rows (negative half first under CFG)
    layout: PathSource
    reference: PathSource
    config: RetouchConfig
    tokens: dict[str, int]  # edited self-attention layer name -> its token count

    def swap(self, step: int, masks: dict[int, torch.Tensor] | None, device) -> dict[str, SwapLayer]:
        """Step `step`'s edits; masks: {tokens: [B, tokens]} weights of the targets' own outputs
        (ones on the other rows), or None while there is no mask yet (no blend)."""
        c = self.config
        swapping = step >= c.swap_start
        blending = step >= c.blend_from and masks is not None
        if not (swapping or blending):
            return {}
        kv_path = self.reference if step >= c.reference_start else self.layout
        kv_source = torch.arange(self.batch, device=device)
        out_source = kv_source.clone()
        kv_read, out_read = {}, {}  # target row -> memory entry
        for image, rows in enumerate(self.targets):
            for k, row in enumerate(rows):
                if swapping:
                    kv_source[row] = self._source(kv_path, image, k, row, kv_read)
                if blending:
                    out_source[row] = self._source(self.layout, image, k, row, out_read)
        kv_memory = kv_path.kv(step) if kv_read else None
        out_memory = self.layout.outputs(step) if out_read else None
        edits = {}
        for name, tokens in self.tokens.items():
            keys = values = outputs = None
            if kv_memory is not None:
                keys, values = (self._slots(t, kv_read, device) for t in kv_memory[name])
            if out_memory is not None:
                outputs = self._slots(out_memory[name], out_read, device)
            edits[name] = SwapLayer(kv_source, out_source, masks[tokens] if blending else None, keys, values, outputs)
        return edits

    def _source(self, path: PathSource, image: int, k: int, row: int, read: dict[int, int]) -> int:
        if path.rows is not None:
            return path.rows[image]
        read[row] = path.entries[image][k]
        return self.batch + row

    def _slots(self, memory: torch.Tensor, read: dict[int, int], device) -> torch.Tensor:
        """[B, N, C]: row r holds memory entry read[r]; rows that read nothing hold zeros."""
        out = memory.new_zeros((self.batch,) + tuple(memory.shape[1:]), device=device)
        rows = list(read)
        out[rows] = memory[[read[r] for r in rows]].to(device)
        return out

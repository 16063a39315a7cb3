"""An LRU of per-prompt text embeddings in front of a text encoder."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch


class TextEmbeddingCache:
    """LRU of per-prompt text embeddings in front of `encode(prompts) -> [B, T, D]`."""

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor], capacity: int):
        self.encode, self.capacity = encode, capacity
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for p in prompts:
                row = self._rows.get(p)
                if row is not None:
                    self._rows.move_to_end(p)
                    found[p] = row
            missing = list(dict.fromkeys(p for p in prompts if p not in found))
            self.hits += len(prompts) - sum(p in missing for p in prompts)
            self.misses += len(missing)
        if missing:
            encoded = self.encode(missing)
            with self._lock:
                for p, row in zip(missing, encoded):
                    found[p] = row = row.clone()
                    if self.capacity:
                        self._rows[p] = row
                        self._rows.move_to_end(p)
                while len(self._rows) > self.capacity:
                    self._rows.popitem(last=False)
        return torch.stack([found[p] for p in prompts])

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._rows), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}

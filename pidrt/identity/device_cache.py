"""LRU cache of identity artifacts resident on the inference device.

Generations for the same few identities arrive in bursts, so the artifacts of recently used
identities stay on the device and a request only pays the host-to-device copy (or a store read)
when its identity is cold. Memory is bounded by an explicit byte budget, not by entry count,
because SCA, EAA and IP artifacts differ in size by orders of magnitude.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Mapping

import torch

from pidrt.errors import PidrtError


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class DeviceCache:
    """Thread-safe LRU of ``id -> {name: tensor on device}`` within ``budget_bytes``.

    ``load`` runs outside the lock, because it may read from disk or even build an identity
    (seconds to minutes) and must not stall hits for other identities. Concurrent misses on the
    same id share a single ``load`` call ("single flight") instead of loading it twice.
    Counters: a *miss* is a get that ran ``load``; every other successful get is a *hit*,
    including one that waited for another thread's load of the same id.
    """

    def __init__(self, budget_bytes: int, device: torch.device | str):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise PidrtError(f"device cache budget must be a non-negative byte count, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._entries: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()  # LRU first
        self._loading: dict[str, Future] = {}
        self._used = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __contains__(self, id: object) -> bool:
        with self._lock:
            return id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def ids(self) -> list[str]:
        """Cached ids, least recently used first (the next to be evicted)."""
        with self._lock:
            return list(self._entries)

    def get(self, id: str, load: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors of ``id`` on the device, calling ``load`` (host tensors) only on a miss."""
        with self._lock:
            hit = self._entries.get(id)
            if hit is not None:
                self._entries.move_to_end(id)
                self._hits += 1
                return dict(hit[0])  # a copy, so callers cannot change what the cache accounts
            pending = self._loading.get(id)
            owner = pending is None
            if owner:
                pending = self._loading[id] = Future()
                self._misses += 1
        if not owner:
            result = pending.result()  # re-raises the loading thread's error
            with self._lock:
                self._hits += 1
            return dict(result)
        try:
            tensors = self._insert(id, load())
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(id, None)
        pending.set_result(tensors)
        return dict(tensors)

    def _insert(self, id: str, host: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(host, Mapping) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in host.items()
        ):
            raise PidrtError(f"loader for identity {id!r} must return a dict of str -> torch.Tensor")
        size = tensors_nbytes(host)
        # Checked before touching the device: such an entry could never stay cached, and copying it
        # would only evict everything else (or run the device out of memory).
        if size > self.budget_bytes:
            raise PidrtError(
                f"identity {id!r} needs {size} bytes on {self.device}, "
                f"more than the whole device cache budget of {self.budget_bytes} bytes"
            )
        with self._lock:
            # Evict first so the old entries' memory can be reused by the copy below; the copy is
            # under the lock so no other insert can claim the room that was just made.
            self._drop(id)
            while self._used + size > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
            on_device = {k: t.detach().to(self.device) for k, t in host.items()}
            self._entries[id] = (on_device, size)
            self._used += size
        return on_device

    def _drop(self, id: str) -> bool:
        entry = self._entries.pop(id, None)
        if entry is None:
            return False
        self._used -= entry[1]
        return True

    def evict(self, id: str) -> bool:
        """Drop ``id``; False if it was not cached. Callers still holding its tensors keep them."""
        with self._lock:
            return self._drop(id)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "entries": len(self._entries),
                "used_bytes": self._used,
                "budget_bytes": self.budget_bytes,
            }

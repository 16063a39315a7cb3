"""DeviceCache: LRU order under a byte budget, oversize entries, counters, thread safety."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.identity.device_cache import DeviceCache, tensors_nbytes

KB = 1024


def entry(kbytes: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """An artifact dict of exactly ``kbytes`` KiB split over two tensors."""
    n = kbytes * KB // torch.tensor([], dtype=dtype).element_size()
    return {"a": torch.ones(n // 2, dtype=dtype), "b": torch.zeros(n - n // 2, dtype=dtype)}


class Loader:
    def __init__(self, tensors):
        self.tensors, self.calls = tensors, 0

    def __call__(self):
        self.calls += 1
        return self.tensors


def test_hit_and_miss_counts():
    cache = DeviceCache(100 * KB, "cpu")
    load = Loader(entry(10))
    first = cache.get("sca-a", load)
    second = cache.get("sca-a", load)
    assert load.calls == 1
    want = entry(10)  # built afresh: what the loader gave, independently of the cache
    assert first.keys() == second.keys() == want.keys() and all(torch.equal(second[k], want[k]) for k in want)
    assert all(second[k].data_ptr() == first[k].data_ptr() for k in want)  # the hit serves the cached copy
    assert "sca-a" in cache and "sca-b" not in cache and len(cache) == 1
    assert cache.used_bytes == 10 * KB
    st = cache.stats()
    assert (st["hits"], st["misses"], st["evictions"], st["entries"]) == (1, 1, 0, 1)
    assert st["used_bytes"] == 10 * KB and st["budget_bytes"] == 100 * KB


def test_lru_eviction_order_and_budget():
    cache = DeviceCache(100 * KB, "cpu")
    loaders = {name: Loader(entry(kb)) for name, kb in [("A", 40), ("B", 30), ("C", 20), ("D", 50), ("E", 10)]}
    for name in "ABC":
        cache.get(name, loaders[name])
    assert cache.used_bytes == 90 * KB and cache.ids() == ["A", "B", "C"]
    cache.get("A", loaders["A"])  # A becomes most recently used; B is now the oldest
    assert cache.ids() == ["B", "C", "A"]
    # D (50) needs 40 KiB freed: evicting B (30) is not enough, C (20) goes too; A stays.
    cache.get("D", loaders["D"])
    assert cache.ids() == ["A", "D"] and cache.used_bytes == 90 * KB
    cache.get("E", loaders["E"])  # fits exactly (100 KiB): nothing evicted
    assert cache.ids() == ["A", "D", "E"] and cache.used_bytes == 100 * KB
    cache.get("B", loaders["B"])  # reload of an evicted entry is a miss and evicts A
    assert cache.ids() == ["D", "E", "B"] and cache.used_bytes == 90 * KB
    assert loaders["B"].calls == 2 and loaders["A"].calls == 1
    st = cache.stats()
    assert (st["hits"], st["misses"], st["evictions"]) == (1, 6, 3)
    assert st["used_bytes"] <= st["budget_bytes"]


def test_budget_counts_bytes_not_elements():
    cache = DeviceCache(16 * KB, "cpu")
    cache.get("half", Loader(entry(8, torch.float16)))
    cache.get("bf", Loader(entry(8, torch.bfloat16)))
    assert cache.ids() == ["half", "bf"] and cache.used_bytes == 16 * KB
    assert tensors_nbytes(entry(8, torch.float16)) == 8 * KB


def test_oversize_entry_raises_and_keeps_cache():
    cache = DeviceCache(64 * KB, "cpu")
    cache.get("small", Loader(entry(16)))
    with pytest.raises(PidrtError) as exc:
        cache.get("huge", Loader(entry(65)))
    msg = str(exc.value)
    assert str(65 * KB) in msg and str(64 * KB) in msg and "huge" in msg
    assert cache.ids() == ["small"] and cache.used_bytes == 16 * KB
    # the failed load does not block a later attempt
    with pytest.raises(PidrtError):
        cache.get("huge", Loader(entry(65)))


def test_evict_and_clear():
    cache = DeviceCache(100 * KB, "cpu")
    for name in "XYZ":
        cache.get(name, Loader(entry(10)))
    assert cache.evict("Y") is True and cache.evict("Y") is False
    assert cache.ids() == ["X", "Z"] and cache.used_bytes == 20 * KB
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0 and "X" not in cache


def test_returned_dict_is_a_copy():
    cache = DeviceCache(100 * KB, "cpu")
    got = cache.get("A", Loader(entry(10)))
    got["extra"] = torch.ones(1000)
    assert set(cache.get("A", Loader(entry(10)))) == {"a", "b"}


def test_loader_errors_propagate_and_bad_results_rejected():
    cache = DeviceCache(100 * KB, "cpu")

    def failing():
        raise RuntimeError("store unavailable")

    with pytest.raises(RuntimeError, match="store unavailable"):
        cache.get("A", failing)
    with pytest.raises(PidrtError, match="str -> torch.Tensor"):
        cache.get("A", lambda: {"a": [1, 2]})
    assert cache.stats()["entries"] == 0 and cache.used_bytes == 0
    with pytest.raises(PidrtError):
        DeviceCache(-1, "cpu")


def test_concurrent_misses_share_one_load():
    cache = DeviceCache(100 * KB, "cpu")
    calls, gate = [], threading.Event()

    def slow_load():
        calls.append(1)
        gate.wait(5)
        return entry(10)

    results, errors = [], []

    def worker():
        try:
            results.append(cache.get("A", slow_load))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(5)
    assert not errors and len(results) == 8 and len(calls) == 1
    st = cache.stats()
    assert st["misses"] == 1 and st["hits"] == 7


def test_threads_keep_budget_invariant():
    cache = DeviceCache(50 * KB, "cpu")
    sizes = {f"id{i}": 5 + (i % 4) * 5 for i in range(12)}  # 5..20 KiB
    errors = []

    def worker(seed: int):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(200):
                name = f"id{int(torch.randint(0, 12, (1,), generator=g))}"
                got = cache.get(name, lambda n=name: entry(sizes[n]))
                assert tensors_nbytes(got) == sizes[name] * KB
                assert cache.used_bytes <= 50 * KB
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    st = cache.stats()
    assert st["hits"] + st["misses"] == 6 * 200
    assert st["used_bytes"] == sum(sizes[i] * KB for i in cache.ids()) <= 50 * KB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_cuda():
    cache = DeviceCache(1 << 20, "cuda")
    got = cache.get("A", Loader(entry(10)))
    assert all(t.device.type == "cuda" for t in got.values())
    assert cache.used_bytes == 10 * KB

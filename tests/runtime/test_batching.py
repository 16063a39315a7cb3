"""Batch formation rules of pidrt.runtime.batching (no torch; a test clock, one consumer thread)."""

from __future__ import annotations

import threading

import pytest

from pidrt.errors import PidrtError
from pidrt.runtime.batching import BatchQueue, Entry, QueueClosed, QueueFull, select

K64, K128 = (64, 64, 4, "ddim", 5.0), (128, 64, 4, "ddim", 5.0)


def entries(*specs):
    return [Entry(key, group, n, item=i) for i, (key, group, n) in enumerate(specs)]


def items(batch):
    return [e.item for e in batch]


def test_select_groups_same_key_and_method_fifo_up_to_max_batch():
    es = entries((K64, "ip", 2), (K128, "ip", 1), (K64, "sca", 1), (K64, None, 1), (K64, "ip", 3), (K64, "ip", 1))
    # head ip(2) + none(1) + ip(1): skips the other size, the other method, and ip(3) that does not fit.
    assert items(select(es, 4)) == [0, 3, 5]


def test_identity_less_head_takes_the_first_method_it_meets():
    es = entries((K64, None, 1), (K64, "sca", 1), (K64, "ip", 1), (K64, None, 1), (K64, "sca", 1))
    assert items(select(es, 8)) == [0, 1, 3, 4]


def test_oversized_request_runs_alone():
    es = entries((K64, None, 6), (K64, None, 1))
    assert items(select(es, 4)) == [0]


class Clock:
    """A clock the test moves: when a batch is due depends on it, not on how fast this machine is."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def taking(q: BatchQueue) -> tuple[threading.Thread, list]:
    """The consumer blocked in `q.take()` on its own thread, and where its batch will land."""
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(q.take()), daemon=True)
    consumer.start()
    return consumer, got


def test_take_waits_for_company_until_max_wait():
    clock = Clock()
    q = BatchQueue(max_batch=4, max_wait_s=0.3, capacity=8, clock=clock)
    q.put(Entry(K64, None, 1, "a"))
    consumer, got = taking(q)
    clock.now = 0.05
    q.put(Entry(K64, "ip", 1, "b"))  # company, but the batch is not full and the head is not due
    consumer.join(0.2)  # (a batch due now would be taken at once, well within this)
    assert consumer.is_alive() and got == []
    clock.now = 0.3  # the head has waited max_wait: the consumer takes what it has by its next look
    consumer.join(30)  # only a hang detector: the consumer re-checks the clock within 0.25 s
    assert items(got[0]) == ["a", "b"] and len(q) == 0


def test_take_returns_at_once_when_full():
    q = BatchQueue(max_batch=2, max_wait_s=30.0, capacity=8, clock=Clock())  # the clock never moves
    for name in "abc":
        q.put(Entry(K64, None, 1, name))
    consumer, got = taking(q)
    consumer.join(30)  # only a hang detector: nothing is ever due by the clock, only a full batch returns
    assert items(got[0]) == ["a", "b"]
    assert len(q) == 1 and q.pending_images() == 1


def test_incompatible_head_goes_first_next_time():
    q = BatchQueue(max_batch=4, max_wait_s=0.0, capacity=8)
    for key, group, name in ((K64, "ip", "a"), (K64, "sca", "b"), (K64, "ip", "c"), (K128, None, "d")):
        q.put(Entry(key, group, 1, name))
    assert [items(q.take()) for _ in range(3)] == [["a", "c"], ["b"], ["d"]]


def test_capacity_remove_close():
    q = BatchQueue(max_batch=4, max_wait_s=0.0, capacity=2)
    a, b = Entry(K64, None, 1, "a"), Entry(K64, None, 1, "b")
    q.put(a)
    q.put(b)
    with pytest.raises(QueueFull):
        q.put(Entry(K64, None, 1, "c"))
    assert q.remove(a) and not q.remove(a)
    assert items(q.take()) == ["b"]
    assert q.take(poll_s=0.05) == []
    q.put(a)
    assert items(q.close()) == ["a"]
    assert q.take() is None
    with pytest.raises(QueueClosed):
        q.put(b)
    with pytest.raises(PidrtError):
        BatchQueue(max_batch=0, max_wait_s=0.0, capacity=1)

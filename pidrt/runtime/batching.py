"""Dynamic batching: a bounded FIFO of pending requests and the rule that groups them.

Requests that can share UNet calls have the same *key* (size, steps, scheduler, guidance, ...)
and compatible *groups* (the identity method: one batch runs one method; a request without an
identity has group None and joins any batch). `BatchQueue.take` returns the oldest request plus
every later compatible one that still fits in `max_batch` images, as soon as the batch is full
or the oldest request has waited `max_wait_s`. The oldest request always goes first, so nothing
starves; a request larger than `max_batch` runs alone (it is never split).

Pure Python and torch-free: the worker thread of `pidrt.runtime.generator` is its only consumer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from pidrt.errors import PidrtError


class QueueFull(PidrtError):
    """The queue holds `capacity` requests already."""


class QueueClosed(PidrtError):
    """The queue was closed (the generator is shutting down)."""


@dataclass(eq=False)
class Entry:
    """One queued request as the batcher sees it."""

    key: Hashable  # must be equal to share a batch
    group: str | None  # must be equal too, except that None joins any group
    images: int  # rows it adds to the batch
    item: Any = None  # the caller's object (a generator job)
    enqueued: float = field(default_factory=time.monotonic)


def compatible(batch_group: str | None, entry: Entry) -> bool:
    return batch_group is None or entry.group is None or entry.group == batch_group


def select(entries: list[Entry] | deque[Entry], max_batch: int) -> list[Entry]:
    """The batch the head (oldest) entry would run in now: FIFO scan for compatible entries that fit."""
    if not entries:
        return []
    head = entries[0]
    chosen, total, group = [head], head.images, head.group
    for entry in list(entries)[1:]:
        if total >= max_batch:
            break
        if entry.key != head.key or not compatible(group, entry) or total + entry.images > max_batch:
            continue
        chosen.append(entry)
        total += entry.images
        group = group if group is not None else entry.group
    return chosen


class BatchQueue:
    """Thread-safe bounded FIFO with batch formation; `take` blocks the (single) consumer."""

    def __init__(self, max_batch: int, max_wait_s: float, capacity: int,
                 clock: Callable[[], float] = time.monotonic):
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise PidrtError(f"batch queue needs max_batch >= 1, capacity >= 1, max_wait >= 0; "
                             f"got {max_batch}, {capacity}, {max_wait_s}")
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._clock = clock
        self._entries: deque[Entry] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def pending_images(self) -> int:
        with self._cond:
            return sum(e.images for e in self._entries)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, entry: Entry) -> None:
        with self._cond:
            if self._closed:
                raise QueueClosed("the generator is shutting down")
            if len(self._entries) >= self.capacity:
                raise QueueFull(f"the queue is full ({self.capacity} requests waiting)")
            entry.enqueued = self._clock()
            self._entries.append(entry)
            self._cond.notify_all()

    def remove(self, entry: Entry) -> bool:
        """Take a queued entry out (a cancelled request); False if it is no longer queued."""
        with self._cond:
            try:
                self._entries.remove(entry)
            except ValueError:
                return False
            self._cond.notify_all()
            return True

    def close(self) -> list[Entry]:
        """Refuse new entries, wake the consumer, and return what was still queued (now removed)."""
        with self._cond:
            self._closed = True
            left = list(self._entries)
            self._entries.clear()
            self._cond.notify_all()
            return left

    def take(self, poll_s: float | None = None) -> list[Entry] | None:
        """Block until a batch is due and return it (removed from the queue).

        Returns None when the queue is closed, or [] when `poll_s` passed with nothing due (lets
        the consumer do periodic work).
        """
        limit = None if poll_s is None else self._clock() + poll_s
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = self._clock()
                if self._entries:
                    batch = select(self._entries, self.max_batch)
                    due = self._entries[0].enqueued + self.max_wait_s
                    if sum(e.images for e in batch) >= self.max_batch or now >= due:
                        for e in batch:
                            self._entries.remove(e)
                        return batch
                    wait = due - now
                else:
                    wait = None
                if limit is not None:
                    if now >= limit:
                        return []
                    wait = limit - now if wait is None else min(wait, limit - now)
                self._cond.wait(wait)

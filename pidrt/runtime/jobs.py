"""A submitted generation: its events, listeners, waiters (sync and asyncio) and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue as queue_mod
import threading
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator


from pidrt.runtime.batching import Entry
from pidrt.runtime.requests import (BatchInfo, Cancelled, Event, GenerationResult, GenerationTimeout, ResolvedRequest, error_info)

if TYPE_CHECKING:
    from pidrt.runtime.generator import Generator

log = logging.getLogger(__name__)

class Job:
    """A submitted request. Thread-safe; listeners are called in event order, under the job's
    lock, from whichever thread produced the event (keep them short and non-blocking)."""

    def __init__(self, generator: "Generator", request: ResolvedRequest, condition, on_event=None, tokens=None):
        self.id = f"gen-{uuid.uuid4().hex[:20]}"
        self.request = request
        self.condition = condition
        self.tokens = tokens  # the request's TokenIdentity (pidrt.models.tokens), or None
        self.created = time.time()
        self.submitted = time.monotonic()
        self.deadline = self.submitted + request.timeout_s
        self.started: float | None = None
        self.state = "queued"  # queued | running | done | error | cancelled
        self.batch: BatchInfo | None = None
        self.entry: Entry | None = None
        self._gen = generator
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._events: list[Event] = []
        self._listeners: list[Callable[[Event], None]] = [on_event] if on_event is not None else []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # ---- public
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def cancel(self) -> bool:
        """Cancel; False if the job had already finished. See the module docstring for semantics."""
        with self._lock:
            if self.done:
                return False
            if self.entry is not None:
                self._gen._queue.remove(self.entry)
            return self._finish(error=Cancelled(f"job {self.id} was cancelled"), state="cancelled")

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the job ends; its result, or raise its error (GenerationTimeout past its deadline)."""
        limit = self.deadline - time.monotonic()
        if timeout is not None:
            limit = min(limit, timeout)
        if not self._done.wait(max(limit, 0.0)):
            if time.monotonic() >= self.deadline:
                self._expire()
            else:
                raise TimeoutError(f"job {self.id} still running after {timeout} s")
        return self._outcome()

    async def wait(self) -> GenerationResult:
        """Await the result; cancelling the awaiting task cancels the job."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake(_ev: Event) -> None:
            if _ev.terminal:
                with contextlib.suppress(RuntimeError):  # loop closed
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        self.subscribe(wake)
        if self.done:
            wake(Event("done", self.id, -1, 0.0))
        try:
            await asyncio.wait_for(fut, max(self.deadline - time.monotonic(), 0.0) + 0.05)
        except asyncio.TimeoutError:
            self._expire()
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self.unsubscribe(wake)
        return self._outcome()

    def subscribe(self, listener: Callable[[Event], None]) -> list[Event]:
        """Add a listener for future events; returns the events so far (atomically: none lost or doubled)."""
        with self._lock:
            self._listeners.append(listener)
            return list(self._events)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    async def stream(self) -> AsyncIterator[Event]:
        """Every event from the first, live, ending with the terminal one."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def push(ev: Event) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, ev)

        history = self.subscribe(push)
        try:
            for ev in history:
                yield ev
                if ev.terminal:
                    return
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), max(self.deadline - time.monotonic(), 0.0) + 0.05)
                except asyncio.TimeoutError:
                    self._expire()
                    continue
                yield ev
                if ev.terminal:
                    return
        finally:
            self.unsubscribe(push)

    def iter_events(self) -> Iterator[Event]:
        """The blocking twin of `stream` for threads."""
        q: queue_mod.Queue[Event] = queue_mod.Queue()
        history = self.subscribe(q.put)
        try:
            for ev in history:
                yield ev
                if ev.terminal:
                    return
            while True:
                try:
                    ev = q.get(timeout=max(self.deadline - time.monotonic(), 0.0) + 0.05)
                except queue_mod.Empty:
                    self._expire()
                    continue
                yield ev
                if ev.terminal:
                    return
        finally:
            self.unsubscribe(q.put)

    # ---- internal (generator side)
    def _emit(self, type_: str, **kw) -> None:
        with self._lock:
            ev = Event(type_, self.id, len(self._events), time.time(), **kw)
            self._events.append(ev)
            for listener in list(self._listeners):
                try:
                    listener(ev)
                except Exception:  # a broken listener must not break the worker
                    log.exception("job %s: event listener failed", self.id)

    def _start(self, batch: BatchInfo) -> bool:
        with self._lock:
            if self.done:
                return False
            if time.monotonic() >= self.deadline:
                self._expire()
                return False
            self.state, self.batch, self.started, self.entry = "running", batch, time.monotonic(), None
            self._emit("started", data={"batch": asdict(batch)})
            return True

    def _expire(self) -> None:
        self.cancel_with(GenerationTimeout(
            f"job {self.id} did not finish within its timeout of {self.request.timeout_s:g} s"), "error")

    def cancel_with(self, error: BaseException, state: str = "error") -> bool:
        with self._lock:
            if self.done:
                return False
            if self.entry is not None:
                self._gen._queue.remove(self.entry)
            return self._finish(error=error, state=state)

    def _finish(self, result: GenerationResult | None = None, error: BaseException | None = None,
                state: str = "done") -> bool:
        with self._lock:
            if self.done:
                return False
            self._result, self._error, self.state = result, error, state
            if result is not None:
                self._emit("done", result=result)
            else:
                self._emit("cancelled" if state == "cancelled" else "error", data=error_info(error))
            self._done.set()
        self._gen._job_finished(self)
        return True

    def _outcome(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

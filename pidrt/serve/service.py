"""What the routes call: an engine (where generations run) plus the job registry and metrics.

`Engine` is the seam between the HTTP layer and the runtime: `LocalEngine` wraps an in-process
`Generator`; `pidrt.serve.ray_app.RayEngine` forwards to Ray Serve replicas. Both deliver the
generator's `Event`s on the event loop, so `ImageService` (sync generations, jobs with replayable
progress, cancellation, client disconnects, metrics) is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import (
    Cancelled,
    Event,
    GenerationRequest,
    GenerationResult,
    Overloaded,
    error_info,
)
from pidrt.serve.errors import (  # noqa: F401 (re-exported: the service's errors)
    ClientGone,
    JobNotFound,
    UploadError,
    UploadTooLarge,
    exception_from_info,
)

log = logging.getLogger(__name__)

EventCallback = Callable[[Event], None]


# ------------------------------------------------------------------------------------ engines
class Running(ABC):
    """A generation an engine accepted."""

    @abstractmethod
    async def result(self) -> GenerationResult:
        ...

    @abstractmethod
    def cancel(self) -> None:
        ...


class Engine(ABC):
    backend: str = "torch"

    @abstractmethod
    async def start(self, request: GenerationRequest, on_event: EventCallback | None = None) -> Running:
        """Submit; returns once the request is queued, or raises why it was refused (Overloaded, ...).
        `on_event` is called on the event loop's thread."""

    @abstractmethod
    async def enroll(self, images: list[bytes], method: str, options: dict) -> dict:
        """{identity_id, method, created, seconds}"""

    @abstractmethod
    async def list_identities(self) -> list:
        """EntryInfo list"""

    @abstractmethod
    async def show_identity(self, identity_id: str):
        """EntryInfo"""

    @abstractmethod
    async def delete_identity(self, identity_id: str) -> None:
        ...

    @abstractmethod
    async def ready(self) -> bool:
        ...

    async def readiness(self) -> dict:
        """/readyz's body: status "ready" (200) or another state (503) and what is loading."""
        return {"status": "ready" if await self.ready() else "not ready", "backend": self.backend}

    def bind_metrics(self, metrics) -> None:
        """Attach engine-side metrics (batch sizes, queue depth) where the engine can."""

    async def stats(self) -> dict:
        return {}

    async def close(self) -> None:
        ...


class _LocalRunning(Running):
    def __init__(self, job):
        self.job = job

    async def result(self) -> GenerationResult:
        return await self.job.wait()

    def cancel(self) -> None:
        self.job.cancel()


class LocalEngine(Engine):
    """The Generator in this process (the worker thread runs the batches)."""

    def __init__(self, generator: Generator, own: bool = False):
        self.generator, self.own = generator, own
        self.backend = generator.backend

    async def start(self, request: GenerationRequest, on_event: EventCallback | None = None) -> Running:
        callback = None
        if on_event is not None:
            loop = asyncio.get_running_loop()

            def callback(ev: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                    loop.call_soon_threadsafe(on_event, ev)

        # Off the loop: a cold identity reads and verifies its store entry, an edit decodes its files
        # (restore_face: detects and aligns the face).
        job = await asyncio.to_thread(self.generator.submit, request, callback)
        return _LocalRunning(job)

    async def enroll(self, images: list[bytes], method: str, options: dict) -> dict:
        e = await asyncio.to_thread(self.generator.enroll, images, method, **options)
        return {"identity_id": e.identity_id, "method": e.method, "created": e.created, "seconds": e.seconds,
                "retouch_reference": e.retouch_reference}

    async def list_identities(self) -> list:
        return await asyncio.to_thread(self.generator.list_identities)

    async def show_identity(self, identity_id: str):
        return await asyncio.to_thread(self.generator.show_identity, identity_id)

    async def delete_identity(self, identity_id: str) -> None:
        await asyncio.to_thread(self.generator.delete_identity, identity_id)

    async def ready(self) -> bool:
        return self.generator.ready

    def bind_metrics(self, metrics) -> None:
        self.generator.add_observer(metrics)
        metrics.bind_queue(self.generator.queue_depth)

    async def stats(self) -> dict:
        return self.generator.stats()

    async def close(self) -> None:
        if self.own:
            await asyncio.to_thread(self.generator.close)


# --------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class ServiceConfig:
    max_upload_bytes: int = 10 * 1024 * 1024  # per uploaded file (face photos, edit images and masks)
    max_upload_images: int = 8
    max_json_bytes: int = 1024 * 1024  # any body that is not a multipart upload (pidrt.serve.limits)
    max_jobs: int = 1024  # job records kept; the oldest finished ones go first
    job_ttl_s: float = 3600.0  # finished job records are dropped after this
    disconnect_poll_s: float = 0.5  # how often a waiting generation checks that its client is still there
    sse_keepalive_s: float = 15.0


class JobRecord:
    """A job as the service keeps it: replayable events, the outcome, the engine handle. Loop-only."""

    def __init__(self):  # not the request: an edit's uploaded files would outlive the job by job_ttl_s
        self.id = f"job-{uuid.uuid4().hex[:24]}"
        self.created = time.time()
        self.finished: float | None = None
        self.state = "queued"
        self.events: list[Event] = []
        self.result: GenerationResult | None = None
        self.error: dict | None = None
        self.running: Running | None = None
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    @property
    def terminal(self) -> bool:
        return self.finished is not None

    def add(self, ev: Event) -> None:
        if self.terminal:
            return  # e.g. the engine's own `cancelled` after the service already recorded it
        ev = dataclasses.replace(ev, job_id=self.id, seq=len(self.events))
        if ev.type == "done" and ev.result is not None:
            ev = dataclasses.replace(ev, result=ev.result.without_tensors())
            self.result = ev.result
        self.events.append(ev)
        if ev.type in ("started", "step"):
            self.state = "running"
        elif ev.terminal:
            self.state = ev.type
            self.error = dict(ev.data) if ev.type != "done" else None
            self.finished = time.time()
        self._changed.set()
        self._changed = asyncio.Event()

    def synthesize(self, type_: str, **kw) -> None:
        self.add(Event(type_, self.id, len(self.events), time.time(), **kw))

    async def stream(self, keepalive_s: float | None = None) -> AsyncIterator[Event | None]:
        """All events from the first; None on `keepalive_s` of silence; ends after the terminal one."""
        i = 0
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                yield ev
                if ev.terminal:
                    return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), keepalive_s)
            except asyncio.TimeoutError:
                yield None

    def summary(self) -> dict:
        steps = [e for e in self.events if e.type == "step"]
        return {
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "finished": self.finished,
            "progress": {"step": steps[-1].step, "steps": steps[-1].steps} if steps else None,
            "error": self.error,
        }


class ImageService:
    def __init__(self, engine: Engine, metrics=None, config: ServiceConfig | None = None):
        self.engine, self.metrics = engine, metrics
        self.config = config or ServiceConfig()
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._inflight = 0
        if metrics is not None:
            engine.bind_metrics(metrics)
            metrics.running.set_function(lambda: self._inflight)

    # ---- accounting
    def count_error(self, what: BaseException | str) -> None:
        """Count an error (an exception, or an error type the HTTP layer produced) in the metrics."""
        if isinstance(what, BaseException):
            self._error(what)
        elif self.metrics is not None:
            self.metrics.observe_error(what)

    def _error(self, exc: BaseException) -> None:
        if self.metrics is not None and not getattr(exc, "_pidrt_counted", False):
            self.metrics.observe_error(error_info(exc)["type"])
            with contextlib.suppress(AttributeError):
                exc._pidrt_counted = True  # the HTTP error handler must not count it again

    def _done(self, result: GenerationResult) -> None:
        if self.metrics is not None:
            self.metrics.observe_result(result)

    async def _start(self, request: GenerationRequest, on_event: EventCallback | None) -> Running:
        try:
            return await self.engine.start(request, on_event)
        except Exception as exc:
            self._error(exc)
            raise

    # ---- generations
    async def generate(self, request: GenerationRequest,
                       is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> GenerationResult:
        """Run one request and return its result; cancelled if the client goes away."""
        run = await self._start(request, None)
        self._inflight += 1
        task = asyncio.ensure_future(run.result())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.disconnect_poll_s)
                if done:
                    break
                if is_disconnected is not None and await is_disconnected():
                    run.cancel()
                    task.cancel()
                    raise ClientGone("the client disconnected; the request was cancelled")
            result = task.result()
        except asyncio.CancelledError:
            run.cancel()
            task.cancel()
            raise
        except Exception as exc:
            self._error(exc)
            raise
        finally:
            self._inflight -= 1
        self._done(result)
        return result

    async def create_job(self, request: GenerationRequest) -> JobRecord:
        self._gc()
        rec = JobRecord()
        rec.running = await self._start(request, rec.add)
        self._jobs[rec.id] = rec
        self._inflight += 1
        rec.task = asyncio.create_task(self._follow(rec))
        return rec

    async def _follow(self, rec: JobRecord) -> None:
        try:
            result = await rec.running.result()
        except asyncio.CancelledError:
            rec.running.cancel()
            if not rec.terminal:
                rec.synthesize("cancelled", data=error_info(Cancelled(f"job {rec.id} was cancelled")))
            raise
        except Exception as exc:
            self._error(exc)
            await asyncio.sleep(0)  # let the engine's own terminal event (already scheduled) land first
            if not rec.terminal:
                rec.synthesize("cancelled" if isinstance(exc, Cancelled) else "error", data=error_info(exc))
        else:
            self._done(result)
            await asyncio.sleep(0)
            if not rec.terminal:
                rec.synthesize("done", result=result)
        finally:
            self._inflight -= 1

    def get_job(self, job_id: str) -> JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or finished more than {self.config.job_ttl_s:g} s ago)")
        return rec

    def cancel_job(self, job_id: str) -> JobRecord:
        rec = self.get_job(job_id)
        if not rec.terminal:
            rec.running.cancel()
            rec.synthesize("cancelled", data=error_info(Cancelled(f"job {rec.id} was cancelled")))
        return rec

    def jobs(self) -> list[JobRecord]:
        return list(self._jobs.values())

    def _gc(self) -> None:
        now = time.time()
        for job_id, rec in list(self._jobs.items()):
            if rec.terminal and now - rec.finished > self.config.job_ttl_s:
                del self._jobs[job_id]
        if len(self._jobs) >= self.config.max_jobs:
            for job_id, rec in list(self._jobs.items()):
                if len(self._jobs) < self.config.max_jobs:
                    break
                if rec.terminal:
                    del self._jobs[job_id]
        if len(self._jobs) >= self.config.max_jobs:
            raise Overloaded(f"{len(self._jobs)} jobs are in flight; retry later", retry_after=5.0)

    # ---- identities
    async def enroll(self, images: list[bytes], method: str, options: dict) -> dict:
        clock = time.perf_counter()
        try:
            out = await self.engine.enroll(images, method, options)
        except Exception as exc:
            self._error(exc)
            raise
        if self.metrics is not None:
            self.metrics.enroll_seconds.labels(method).observe(time.perf_counter() - clock)
        return out

    async def list_identities(self) -> list:
        return await self.engine.list_identities()

    async def show_identity(self, identity_id: str):
        return await self.engine.show_identity(identity_id)

    async def delete_identity(self, identity_id: str) -> None:
        await self.engine.delete_identity(identity_id)

    async def close(self) -> None:
        for rec in self._jobs.values():
            if rec.task is not None and not rec.task.done():
                rec.task.cancel()
        await self.engine.close()

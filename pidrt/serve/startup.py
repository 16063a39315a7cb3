"""A server that answers while its backend starts: `/healthz` at once, `/readyz` 503 until warm.

`StartingEngine` builds the Generator (models, engines from the cache or an export, warm-up of
every bucket) on a thread and serves nothing but status until it is done: generations and
enrollments get 503 `not_ready` with what is still loading, and `/readyz` answers 503 with a body
naming the current stage (`Startup.status()`), then 200 once every bucket is warm. A build that
fails is reported there (and `on_failure` lets `pidrt serve` exit with the reason).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import GenerationError
from pidrt.serve.service import Engine, LocalEngine

log = logging.getLogger(__name__)


class NotReady(GenerationError):
    status, kind = 503, "not_ready"


class Startup:
    """What a starting server has done and is doing (thread-safe; /readyz renders it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.current = "starting"
        self.done: list[str] = []
        self.error: str | None = None
        self.ready = False

    def stage(self, text: str) -> None:
        with self._lock:
            if self.current != "starting":
                self.done.append(self.current)
            self.current = text
        log.info("start-up: %s", text)

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self.error, self.ready = error, error is None
            if error is None:
                self.done.append(self.current)

    def status(self) -> dict:
        with self._lock:
            state = "ready" if self.ready else "failed" if self.error else "loading"
            body = {"status": state, "seconds": round(time.monotonic() - self.started, 1), "done": list(self.done)}
            if state == "loading":
                body["loading"] = self.current
            if self.error:
                body["error"] = self.error
            return body


class StartingEngine(Engine):
    """An Engine whose Generator is built by `build(on_stage)` on a thread; a LocalEngine once built."""

    def __init__(self, build: Callable[[Callable[[str], None]], Generator], backend: str = "auto",
                 on_failure: Callable[[str], None] | None = None):
        self.backend = backend
        self.startup = Startup()
        self.on_failure = on_failure
        self._local: LocalEngine | None = None
        self._metrics = None
        self._bind_lock = threading.Lock()
        self._thread = threading.Thread(target=self._build, args=(build,), name="pidrt-startup", daemon=True)
        self._thread.start()

    def _build(self, build) -> None:
        try:
            generator = build(self.startup.stage)
        except BaseException as exc:  # noqa: BLE001 - reported on /readyz and to the server
            reason = f"{type(exc).__name__}: {exc}"
            log.error("the backend failed to start: %s", reason)
            self.startup.finish(reason)
            if self.on_failure is not None:
                self.on_failure(reason)
            return
        local = LocalEngine(generator, own=True)
        self.backend = local.backend
        with self._bind_lock:  # metrics are bound exactly once, whichever comes first
            self._local = local
            if self._metrics is not None:
                local.bind_metrics(self._metrics)
        self.startup.finish()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build ended (True if it succeeded)."""
        self._thread.join(timeout)
        return self._local is not None

    @property
    def local(self) -> LocalEngine:
        if self._local is None:
            s = self.startup.status()
            what = s.get("loading") if s["status"] == "loading" else f"start-up failed: {s.get('error')}"
            raise NotReady(f"the server is not ready yet ({what}); poll /readyz")
        return self._local

    async def start(self, request, on_event=None):
        return await self.local.start(request, on_event)

    async def enroll(self, images, method, options):
        return await self.local.enroll(images, method, options)

    async def list_identities(self):
        return await self.local.list_identities()

    async def show_identity(self, identity_id):
        return await self.local.show_identity(identity_id)

    async def delete_identity(self, identity_id):
        await self.local.delete_identity(identity_id)

    async def ready(self) -> bool:
        return self._local is not None and await self._local.ready()

    async def readiness(self) -> dict:
        body = self.startup.status()
        if body["status"] == "ready" and not await self.ready():
            body["status"] = "not ready"  # built, but the worker stopped (shutting down)
        return {**body, "backend": self.backend}

    def bind_metrics(self, metrics) -> None:
        with self._bind_lock:
            self._metrics = metrics  # bound to the generator once it exists
            if self._local is not None:
                self._local.bind_metrics(metrics)

    async def stats(self) -> dict:
        return await self.local.stats() if self._local is not None else {"startup": self.startup.status()}

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()

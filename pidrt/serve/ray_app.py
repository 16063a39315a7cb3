"""Ray Serve scale-out: the same HTTP API in front of N generator replicas (one per GPU).

    HTTP -> Ray proxy -> PidrtIngress (FastAPI via serve.ingress; jobs, SSE, metrics)
                          -> PidrtGenerator replicas (a Generator each; num_gpus=1 by default)

Identity affinity: a generation's identity id is its *multiplexed model id*
(`handle.options(multiplexed_model_id=identity)`); each replica loads identities through a
`serve.multiplexed` loader (an LRU of `max_identities_per_replica`), and Ray routes a request to
a replica that already holds its identity when one exists, so an identity's artifacts stay
where they were loaded. Requests without identity go to any replica. Each replica batches what
it receives exactly as the single-process server does.

Replicas share the identity store directory (a shared volume across nodes); enrollment runs on
any replica and writes there. Needs Ray >= 2.47 (`serve.ingress` with an app builder function).

    from pidrt.serve.ray_app import RaySettings, run_ray
    run_ray(RaySettings(store_dir="/shared/pidrt-store", num_gpus=1, backend=BackendOptions(backend="trt"),
                        autoscaling=Autoscaling(min_replicas=1, max_replicas=4)), port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from pidrt.engines.options import BackendOptions
from pidrt.errors import PidrtError, require
from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import (
    Event,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    GeneratorConfig,
    Overloaded,
    error_info,
)
from pidrt.runtime.setup import RuntimeOptions
from pidrt.serve.auth import AuthConfig, check_bind
from pidrt.serve.service import Engine, Running, ServiceConfig, exception_from_info

log = logging.getLogger(__name__)

ray = require("ray", "serve")
serve = require("ray.serve", "serve")

GENERATOR_NAME = "PidrtGenerator"
INGRESS_NAME = "PidrtIngress"


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve autoscaling of the generator replicas (each takes `num_gpus`)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # per replica; about two full batches
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def to_ray(self) -> dict:
        d = asdict(self)
        if d["initial_replicas"] is None:
            del d["initial_replicas"]
        return d


@dataclass(frozen=True)
class RaySettings:
    store_dir: str
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # its device is replaced by "cuda" with GPUs
    backend: BackendOptions = field(default_factory=BackendOptions)  # auto: fast on GPU replicas, torch on CPU
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    num_replicas: int = 1  # used when autoscaling is None
    autoscaling: Autoscaling | None = None
    num_gpus: float = 1.0  # per generator replica: one replica per GPU; 0 runs on CPU
    num_cpus: float = 1.0  # per generator replica
    ingress_num_cpus: float = 0.0
    max_ongoing_requests: int = 64  # per replica; past it Ray queues at the caller
    max_queued_requests: int = -1  # caller-side queue limit (-1: none); past it -> 429
    max_identities_per_replica: int = 16
    app_name: str = "pidrt"
    route_prefix: str = "/"
    # Builds the replica's Generator (default: `factory.build_generator` over `runtime`); must pickle.
    generator_factory: Callable[["RaySettings"], Generator] | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)  # API keys, as `pidrt serve` (pidrt.serve.auth)
    allow_unauthenticated: bool = False  # run_ray on a non-loopback host without keys

    @property
    def replica_device(self) -> str:
        return "cuda" if self.num_gpus > 0 else self.runtime.device


def _demo_generator(settings: RaySettings) -> Generator:
    from pidrt.serve.factory import build_generator

    runtime = dataclasses.replace(settings.runtime, device=settings.replica_device)
    return build_generator(settings.store_dir, runtime, settings.generator, settings.backend, progress=False)


class _LoadedIdentity:
    """What the multiplexed loader returns; Ray calls __del__ when it drops the id (LRU)."""

    def __init__(self, generator: Generator, identity_id: str):
        self.generator, self.identity_id = generator, identity_id

    def __del__(self):
        with contextlib.suppress(Exception):
            self.generator.forget(self.identity_id)


def _guard(fn):
    """Replica methods answer {"ok": value} or {"error": info}: PidrtErrors cross the process intact."""

    async def wrapper(self, *args):
        try:
            return {"ok": await fn(self, *args)}
        except Exception as exc:
            return {"error": error_info(exc)}

    wrapper.__name__ = fn.__name__
    return wrapper


class PidrtGenerator:
    """One replica: a Generator on its device, identities multiplexed by id."""

    def __init__(self, settings: RaySettings):
        self.settings = settings
        self.generator = (settings.generator_factory or _demo_generator)(settings)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = None
        # Wired at init so the LRU size comes from the settings (Ray detects instance attributes).
        # A plain function, not a bound method: Ray keeps its LRU as an attribute of the function.
        async def load_identity(identity_id: str) -> _LoadedIdentity:
            return await self._load_identity(identity_id)

        self.load_identity = serve.multiplexed(max_num_models_per_replica=settings.max_identities_per_replica)(
            load_identity)

    async def _load_identity(self, identity_id: str) -> _LoadedIdentity:
        await asyncio.to_thread(self.generator.identity, identity_id)
        return _LoadedIdentity(self.generator, identity_id)

    async def generate_stream(self, request: GenerationRequest):
        """Yields the job's events: `queued` (or `error` if refused), progress, then the terminal one.
        The caller cancelling the stream cancels the job."""
        job = None
        try:
            identity = serve.get_multiplexed_model_id()
            if identity:
                await self.load_identity(identity)
            job = await asyncio.to_thread(self.generator.submit, request)
        except Exception as exc:
            yield Event("error", "", 0, 0.0, data=error_info(exc))
            return
        try:
            async for ev in job.stream():
                if ev.result is not None:
                    result = ev.result.without_tensors()
                    result.replica = self.replica
                    ev = Event(ev.type, ev.job_id, ev.seq, ev.time, ev.step, ev.steps, ev.data, result)
                yield ev
        finally:
            job.cancel()  # no-op when it finished; the caller went away otherwise

    @_guard
    async def enroll(self, images: list[bytes], method: str, options: dict) -> dict:
        e = await asyncio.to_thread(self.generator.enroll, images, method, **options)
        return {"identity_id": e.identity_id, "method": e.method, "created": e.created, "seconds": e.seconds,
                "retouch_reference": e.retouch_reference}

    @_guard
    async def list_identities(self) -> list:
        return await asyncio.to_thread(self.generator.list_identities)

    @_guard
    async def show_identity(self, identity_id: str):
        return await asyncio.to_thread(self.generator.show_identity, identity_id)

    @_guard
    async def delete_identity(self, identity_id: str) -> None:
        await asyncio.to_thread(self.generator.delete_identity, identity_id)

    async def stats(self) -> dict:
        return {"replica": self.replica, **self.generator.stats(),
                "loaded_identities": self.generator.cached_identities()}

    async def ready(self) -> bool:
        return self.generator.ready

    def check_health(self) -> None:  # Ray restarts a replica whose worker died
        if not self.generator.ready:
            raise RuntimeError("the generator worker is not running")

    def __del__(self):
        with contextlib.suppress(Exception):
            self.generator.close(timeout=5)


# --------------------------------------------------------------------------------- ingress side
class _RayRunning(Running):
    def __init__(self, stream, on_event):
        self.stream, self.on_event = stream, on_event
        self.task = asyncio.ensure_future(self._consume())

    async def _consume(self) -> GenerationResult:
        try:
            async for ev in self.stream:
                if self.on_event is not None:
                    self.on_event(ev)
                if ev.type == "done":
                    return ev.result
                if ev.terminal:
                    raise exception_from_info(ev.data)
        except (PidrtError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the replica died mid-stream
            raise GenerationFailed(f"the generator replica failed: {type(exc).__name__}: {exc}") from None
        raise GenerationFailed("the generator replica ended the stream without a result")

    async def result(self) -> GenerationResult:
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.cancel()
        self.task.cancel()


class RayEngine(Engine):
    """Forwards to the generator deployment; identities route by multiplexed model id."""

    def __init__(self, get_handle: Callable[[], Any], backend: str = "torch"):
        self._get_handle, self._handle = get_handle, None
        self.backend = backend

    @property
    def handle(self):
        if self._handle is None:
            self._handle = self._get_handle()
        return self._handle

    async def start(self, request: GenerationRequest, on_event=None) -> Running:
        from ray.serve.exceptions import BackPressureError

        handle = self.handle.options(stream=True, **({"multiplexed_model_id": request.identity}
                                                     if request.identity else {}))
        stream = handle.generate_stream.remote(request)
        try:
            first = await stream.__anext__()
        except BackPressureError as exc:
            raise Overloaded(f"every replica is busy ({exc})", retry_after=5.0) from None
        except Exception as exc:  # a replica died or could not be reached
            raise GenerationFailed(f"the generator replica failed: {type(exc).__name__}: {exc}") from None
        if first.type == "error":
            raise exception_from_info(first.data)
        if on_event is not None:
            on_event(first)
        return _RayRunning(stream, on_event)

    async def _call(self, method: str, *args):
        out = await getattr(self.handle, method).remote(*args)
        if "error" in out:
            raise exception_from_info(out["error"])
        return out["ok"]

    async def enroll(self, images: list[bytes], method: str, options: dict) -> dict:
        return await self._call("enroll", images, method, options)

    async def list_identities(self) -> list:
        return await self._call("list_identities")

    async def show_identity(self, identity_id: str):
        return await self._call("show_identity", identity_id)

    async def delete_identity(self, identity_id: str) -> None:
        await self._call("delete_identity", identity_id)

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.ready.remote(), 10))
        except Exception:
            return False

    async def readiness(self) -> dict:
        if await self.ready():
            return {"status": "ready", "backend": self.backend}
        # Replicas build their models, engines and warm-up in their constructors.
        return {"status": "loading", "backend": self.backend,
                "loading": "the generator replicas (models, engines, warm-up of every bucket)"}

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


def _ingress_builder(settings: RaySettings):
    def build_app():  # runs on the ingress replica
        from pidrt.serve.app import create_app

        engine = RayEngine(lambda: serve.get_deployment_handle(GENERATOR_NAME, app_name=settings.app_name),
                           backend=settings.backend.backend)
        return create_app(engine, settings.service, max_batch=settings.generator.max_batch, auth=settings.auth)

    return build_app


def build_ray_app(settings: RaySettings):
    """The Ray Serve application: ingress + generator deployments (for `serve.run`)."""
    gen_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": settings.num_gpus, "num_cpus": settings.num_cpus},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
    }
    if settings.autoscaling is not None:
        gen_options["autoscaling_config"] = settings.autoscaling.to_ray()
    else:
        gen_options["num_replicas"] = settings.num_replicas
    generator = serve.deployment(PidrtGenerator, name=GENERATOR_NAME).options(**gen_options).bind(settings)
    ingress_cls = serve.ingress(_ingress_builder(settings))()
    ingress = serve.deployment(ingress_cls, name=INGRESS_NAME).options(
        ray_actor_options={"num_cpus": settings.ingress_num_cpus}, max_ongoing_requests=1024)
    return ingress.bind(generator)  # binding it deploys the generator within the same application


def run_ray(settings: RaySettings, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False, **init_kw):
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the application."""
    check_bind(host, settings.auth, settings.allow_unauthenticated)
    if not ray.is_initialized():
        ray.init(**init_kw)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_ray_app(settings), name=settings.app_name, route_prefix=settings.route_prefix,
                     blocking=blocking)

"""`create_app(generator) -> FastAPI` and `serve_main(config)` (what `pidrt serve` runs).

    python -m pidrt.serve.app --preset tiny --port 8000 --store ./pidrt-store   # same as `pidrt serve`
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pidrt.engines.options import BackendOptions, add_backend_arguments, backend_options_from_args
from pidrt.errors import PidrtError, require
from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import Defaults, GeneratorConfig
from pidrt.runtime.setup import (
    RuntimeOptions,
    add_runtime_arguments,
    runtime_options_from_args,
)
from pidrt.serve.service import Engine, ImageService, LocalEngine, ServiceConfig

log = logging.getLogger(__name__)


def create_app(generator: Generator | Engine, config: ServiceConfig | None = None, metrics: bool = True,
               own: bool = False, max_batch: int | None = None):
    """A FastAPI app over a Generator (in process) or any Engine (e.g. Ray). `own`: close the
    generator when the app shuts down. Every app has its own Prometheus registry."""
    fastapi = require("fastapi", "serve")
    from pidrt.serve.metrics import ServiceMetrics
    from pidrt.serve.routes import MetricsMiddleware, install_routes

    engine = generator if isinstance(generator, Engine) else LocalEngine(generator, own=own)
    if max_batch is None:
        max_batch = generator.config.max_batch if isinstance(generator, Generator) else 8
    m = ServiceMetrics(max_batch=max_batch) if metrics else None
    service = ImageService(engine, m, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    app = fastapi.FastAPI(title="pidrt", summary="personalized-identity Stable Diffusion 1.5 serving",
                          version=_version(), lifespan=lifespan)
    app.state.service, app.state.metrics = service, m
    install_routes(app, service, m)
    if m is not None:
        app.add_middleware(MetricsMiddleware, metrics=m)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pidrt")
    except Exception:
        return "0"


@dataclass(frozen=True)
class ServeConfig:
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    store: Path = Path("pidrt-store")
    log_level: str = "info"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    backend: BackendOptions = field(default_factory=BackendOptions)


def serve_main(config: ServeConfig, generator: Generator | None = None) -> int:
    """Serve `generator`, or build one from `config` while already answering /healthz and /readyz
    (503 with what is loading until every bucket is warm). A backend that cannot run here fails
    before the server starts; a start-up that fails later stops it (exit status 1)."""
    uvicorn = require("uvicorn", "serve")
    engine = None
    if generator is None:
        from pidrt.engines.choose import preflight
        from pidrt.serve.factory import build_generator
        from pidrt.serve.startup import StartingEngine

        preflight(config.backend, config.runtime.device)
        engine = StartingEngine(lambda on_stage: build_generator(config.store, config.runtime, config.generator,
                                                                 config.backend, on_stage=on_stage),
                                backend=config.backend.backend)
    app = create_app(engine or generator, config.service, own=True, max_batch=config.generator.max_batch)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           timeout_graceful_shutdown=10))
    if engine is not None:
        engine.on_failure = lambda reason: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down (as uvicorn.run does)
        pass
    return 1 if engine is not None and engine.startup.error else 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `pidrt serve` options (the CLI can reuse them)."""
    g = GeneratorConfig()
    add_runtime_arguments(p)
    add_backend_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", type=Path, default=Path("pidrt-store"), help="identity store directory")
    p.add_argument("--max-batch", type=int, default=g.max_batch, help="images per UNet batch")
    p.add_argument("--identity-device-mib", type=int, default=g.identity_device_mib,
                   help="keep identity artifacts on the device in an LRU of this many MiB (0: host memory)")
    p.add_argument("--max-wait-ms", type=float, default=g.max_wait_ms)
    p.add_argument("--queue-size", type=int, default=g.queue_size)
    p.add_argument("--timeout-s", type=float, default=g.timeout_s)
    p.add_argument("--steps", type=int, default=None, help="default step count")
    p.add_argument("--detector", default=g.enroll_detector, help="face detector for enrollment")
    p.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    defaults = Defaults() if args.steps is None else Defaults(steps=args.steps)
    gen = GeneratorConfig(max_batch=args.max_batch, identity_device_mib=args.identity_device_mib, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                          timeout_s=args.timeout_s, enroll_detector=args.detector, defaults=defaults)
    return ServeConfig(runtime=runtime_options_from_args(args), host=args.host, port=args.port, store=args.store,
                       log_level=args.log_level, generator=gen, backend=backend_options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pidrt.serve.app", description="serve pidrt over HTTP")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        return serve_main(config_from_args(args))
    except PidrtError as exc:  # e.g. a backend that cannot run here: the reason, not a traceback
        print(f"pidrt serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

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
from pidrt.serve.auth import AuthConfig, add_auth_arguments, auth_from_args, check_bind
from pidrt.serve.service import Engine, ImageService, LocalEngine, ServiceConfig

log = logging.getLogger(__name__)


def create_app(generator: Generator | Engine, config: ServiceConfig | None = None, metrics: bool = True,
               own: bool = False, max_batch: int | None = None, auth: AuthConfig | None = None):
    """A FastAPI app over a Generator (in process) or any Engine (e.g. Ray). `own`: close the
    generator when the app shuts down. Every app has its own Prometheus registry. `auth`: API
    keys every route but the probes needs (pidrt.serve.auth); None or no keys: open."""
    fastapi = require("fastapi", "serve")
    from pidrt.serve.a1111 import install_a1111_routes
    from pidrt.serve.auth import ApiKeyAuth
    from pidrt.serve.limits import BodyLimit, multipart_limit
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
    install_a1111_routes(app, service, _version())
    # Added innermost first: metrics see every answer, keys are checked before a body is read.
    cfg = service.config
    app.add_middleware(BodyLimit, max_json_bytes=cfg.max_json_bytes,
                       max_multipart_bytes=multipart_limit(cfg.max_upload_bytes, cfg.max_upload_images))
    app.add_middleware(ApiKeyAuth, config=auth or AuthConfig(),
                       on_refused=lambda status: service.count_error("unauthorized" if status == 401 else "forbidden"))
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
    auth: AuthConfig = field(default_factory=AuthConfig)
    allow_unauthenticated: bool = False  # serve a non-loopback host without keys
    backend: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise PidrtError(f"port must be in 1..65535; got {self.port}")


def serve_main(config: ServeConfig, generator: Generator | None = None) -> int:
    """Serve `generator`, or build one from `config` while already answering /healthz and /readyz
    (503 with what is loading until every bucket is warm). A backend that cannot run here fails
    before the server starts; a start-up that fails later stops it (exit status 1)."""
    uvicorn = require("uvicorn", "serve")
    check_bind(config.host, config.auth, config.allow_unauthenticated)  # before loading any model
    engine = None
    if generator is None:
        from pidrt.engines.choose import preflight
        from pidrt.serve.factory import build_generator
        from pidrt.serve.startup import StartingEngine

        from pidrt.identity.store import IdentityStore

        preflight(config.backend, config.runtime.device)
        IdentityStore(config.store)  # a bad store path fails now, not in the start-up thread
        engine = StartingEngine(lambda on_stage: build_generator(config.store, config.runtime, config.generator,
                                                                 config.backend, on_stage=on_stage),
                                backend=config.backend.backend)
    app = create_app(engine or generator, config.service, own=True, max_batch=config.generator.max_batch,
                     auth=config.auth)
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
    from pidrt.argtypes import nonnegative_float, nonnegative_int, port, positive_float, positive_int
    from pidrt.identity.faces import BACKENDS

    g = GeneratorConfig()
    add_runtime_arguments(p)
    add_backend_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs API keys)")
    p.add_argument("--port", type=port, default=8000, help="TCP port, 1..65535")
    p.add_argument("--store", type=Path, default=Path("pidrt-store"), help="identity store directory (created if missing)")
    add_auth_arguments(p)
    p.add_argument("--max-batch", type=positive_int, default=g.max_batch, help="images per UNet batch")
    p.add_argument("--identity-device-mib", type=nonnegative_int, default=g.identity_device_mib,
                   help="keep identity artifacts on the device in an LRU of this many MiB (0: host memory)")
    p.add_argument("--max-wait-ms", type=nonnegative_float, default=g.max_wait_ms,
                   help="how long the oldest queued request waits for others to share its batch")
    p.add_argument("--queue-size", type=positive_int, default=g.queue_size, help="queued requests; more get 429")
    p.add_argument("--timeout-s", type=positive_float, default=g.timeout_s, help="per request, from submission to result")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"step count of requests that name none (default: {g.defaults.steps}; an EAA identity's "
                        "own count wins)")
    p.add_argument("--detector", default=g.enroll_detector, choices=BACKENDS, help="face detector for enrollment")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    defaults = Defaults() if args.steps is None else Defaults(steps=args.steps)
    gen = GeneratorConfig(max_batch=args.max_batch, identity_device_mib=args.identity_device_mib, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                          timeout_s=args.timeout_s, enroll_detector=args.detector, defaults=defaults)
    return ServeConfig(runtime=runtime_options_from_args(args), host=args.host, port=args.port, store=args.store,
                       log_level=args.log_level, generator=gen, auth=auth_from_args(args),
                       allow_unauthenticated=args.allow_unauthenticated, backend=backend_options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    from pidrt.argtypes import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m pidrt.serve.app", description="serve pidrt over HTTP",
                                formatter_class=HelpFormatter)
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

"""A backend name -> a pipeline the harness can time, or the reason it cannot run.

The backends are built by `pidrt.engines.choose.open_backend`, the same builder `pidrt serve`,
`pidrt generate` and the Ray replicas use, with what a benchmark needs on top:

- the torch models stay in memory (`keep_torch_unet`): the torch reference shares them and is
  timed beside the others;
- `fast` converts those models in place (no second copy in device memory), so the harness runs
  it last;
- no start-up warm-up: the harness warms every case itself.

A backend that is missing, or cannot run on this machine, comes back with `available=False`
and a reason; a method a backend cannot run (e.g. EAA's recompute placement through a graph)
is reported by the harness as a skipped case with the error's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pidrt.engines.options import BackendOptions, Bucket, Buckets
from pidrt.errors import PidrtError


@dataclass
class BackendRun:
    name: str
    available: bool
    reason: str = ""
    info: dict = field(default_factory=dict)
    opened: object = None  # pidrt.engines.choose.OpenedBackend

    def pipeline(self, method: str):
        return self.opened.pipeline

    def report(self) -> dict:
        return self.opened.report() if self.opened is not None else self.info

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


def open_backend(name: str, pipe, encoders, batch_sizes, height: int, width: int, methods, *,
                 engines: Path | None = None, engine_cache: Path | None = None,
                 threads: int | None = None) -> BackendRun:
    from pidrt.engines.choose import open_backend as build

    options = BackendOptions(backend=name, engines=engines if name in ("ort", "trt") else None,
                             cache_dir=engine_cache, methods=tuple(methods),
                             buckets=Buckets(tuple(Bucket(width, height, b) for b in batch_sizes)),
                             keep_torch_unet=True, threads=threads, warmup=False)
    try:
        opened = build(options, pipe, encoders, max_batch=max(batch_sizes), progress=False)
    except PidrtError as exc:
        return BackendRun(name, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - an export or engine build that breaks must not end the run
        return BackendRun(name, False, f"setup failed: {type(exc).__name__}: {exc}")
    return BackendRun(name, True, info=opened.info, opened=opened)

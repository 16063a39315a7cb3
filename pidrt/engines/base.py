"""The runner interface every backend implements, the backend enum, registry and availability.

A `GraphRunner` runs one exported graph (its `ModelSpec`) on named torch tensors and returns
named torch tensors; `torch` (the reference), `ort` and `trt` implement it. Backend modules are
imported only when used, so `import pidrt.engines` needs neither onnxruntime nor TensorRT, and a
backend that cannot run says why (`availability`), which `pidrt doctor` prints (`doctor_report`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch

from pidrt.errors import MissingDependencyError, PidrtError
from pidrt.export.inputs import TORCH_DTYPES
from pidrt.export.specs import ModelSpec


class Backend(str, Enum):
    TORCH = "torch"  # the reference: the wrapper modules run eagerly
    ORT = "ort"  # onnxruntime: CPU EP, or CUDA / TensorRT EP with onnxruntime-gpu
    TRT = "trt"  # TensorRT engines built through polygraphy

    @classmethod
    def parse(cls, value: Backend | str) -> Backend:
        try:
            return cls(value)
        except ValueError:
            raise PidrtError(f"unknown backend {value!r}; choose one of {[b.value for b in cls]}") from None


@dataclass(frozen=True)
class Availability:
    backend: Backend
    available: bool
    reason: str = ""  # why not, with the fix
    version: str | None = None
    devices: tuple[str, ...] = ()
    details: dict = field(default_factory=dict, hash=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["backend"] = self.backend.value
        d["devices"] = list(self.devices)
        return d


class BackendUnavailable(PidrtError):
    """The backend cannot run here; the message says why and how to fix it."""


class GraphRunner(ABC):
    """Runs one graph. Subclasses set `backend` and implement `_run` on checked feeds."""

    backend: Backend

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feed: every spec input, with the spec's dtype, on one device -> {output name: tensor}."""
        env = self.check_feed(feed)
        return self._run(dict(feed), env)

    __call__ = run

    def check_feed(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        env = self.spec.bind_inputs({k: tuple(v.shape) for k, v in feed.items()})
        for t in self.spec.inputs:
            if feed[t.name].dtype != TORCH_DTYPES[t.dtype]:
                raise PidrtError(f"{self.spec.name} input {t.name!r}: dtype {feed[t.name].dtype}, graph takes {t.dtype}")
        devices = {v.device for v in feed.values()}
        if len(devices) > 1:
            raise PidrtError(f"{self.spec.name}: inputs on several devices {sorted(map(str, devices))}")
        return env

    @abstractmethod
    def _run(self, feed: dict[str, torch.Tensor], env: dict[str, int]) -> dict[str, torch.Tensor]:
        ...

    def close(self) -> None:
        """Release sessions / engines (optional)."""


# Backend -> module implementing `probe() -> Availability` and
# `open_runner(entry: GraphEntry, models, **options) -> GraphRunner`.
_MODULES = {
    Backend.TORCH: "pidrt.engines.torch_backend",
    Backend.ORT: "pidrt.engines.ort_backend",
    Backend.TRT: "pidrt.engines.trt_backend",
}


def register(backend: Backend, module: str) -> None:
    """Point a backend at another implementation module (tests, out-of-tree backends)."""
    _MODULES[Backend.parse(backend)] = module


def backend_module(backend: Backend | str):
    return importlib.import_module(_MODULES[Backend.parse(backend)])


def availability(backend: Backend | str) -> Availability:
    backend = Backend.parse(backend)
    try:
        return backend_module(backend).probe()
    except Exception as exc:  # noqa: BLE001 (a broken install must not crash `pidrt doctor`)
        return Availability(backend, False, f"probing failed: {type(exc).__name__}: {exc}")


def require_backend(backend: Backend | str) -> Availability:
    """Availability of a runnable backend, else a clear error (MissingDependencyError for packages)."""
    info = availability(backend)
    if not info.available:
        cls = MissingDependencyError if "pip install" in info.reason else BackendUnavailable
        raise cls(f"backend {info.backend.value!r} cannot run here: {info.reason}")
    return info


def doctor_report() -> list[dict]:
    """One dict per backend: backend, available, reason, version, devices, details."""
    return [availability(b).as_dict() for b in Backend]


def torch_devices() -> tuple[str, ...]:
    if not torch.cuda.is_available():
        return ("cpu",)
    return ("cpu",) + tuple(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count()))

"""Clocks, order statistics and peak memory for the benchmark.

Stage boundaries are host clocks (`time.perf_counter`) taken after a device synchronisation on
CUDA, so a stage's time is the work it queued, not the time it took to queue it. On CPU the
synchronisation is a no-op.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` since a reset before the timed runs
(torch's allocator only: onnxruntime and TensorRT allocate outside it, so for those backends the
device's used memory after the runs is reported too). On CPU, the process's peak resident set
size (VmHWM), reset before the timed runs through /proc/self/clear_refs where the kernel allows
it, else the lifetime peak (`ru_maxrss`), which only grows: the JSON says which one it is.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict:
    """median, p95, min, max, mean of the timed runs (p95 of n < 20 runs is interpolated toward the max)."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": percentile(values, 50), "p95": percentile(values, 95),
            "min": min(values), "max": max(values), "mean": sum(values) / len(values)}


@dataclass
class MemoryProbe:
    """Peak memory over a span: `reset()` before, `read()` after."""

    device: torch.device

    def __post_init__(self):
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else None

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.kind = "process_peak_rss" if _reset_hwm() else "process_max_rss_lifetime"

    def read(self) -> dict:
        if self.device.type == "cuda":
            sync(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            return {"kind": self.kind, "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "device_used_after_bytes": int(total - free)}
        hwm = _read_hwm() if self.kind == "process_peak_rss" else None
        return {"kind": self.kind, "peak_bytes": hwm if hwm is not None else _max_rss()}


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _read_hwm() is not None
    except OSError:
        return False


def _read_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class StageClock:
    """Per-stage seconds of one `Pipeline.generate` call, synchronised on CUDA.

    `generate` reaches its stages through `encode_text`, the step loop and `decode`; the clock
    wraps the first and last as instance attributes (removed on exit) and syncs after the last
    step through `on_step`, so the pipeline's own `timings` split on device-complete boundaries.
    """

    def __init__(self, pipe, steps: int):
        self.pipe, self.steps, self.device = pipe, steps, pipe.device

    def on_step(self, i: int, steps: int) -> None:
        if i == steps - 1:
            sync(self.device)

    def __enter__(self):
        pipe, device = self.pipe, self.device
        if device.type != "cuda":
            return self
        self._saved = {name: pipe.__dict__.get(name) for name in ("encode_text", "decode")}
        encode, decode = pipe.encode_text, pipe.decode

        def encode_text(prompts):
            out = encode(prompts)
            sync(device)
            return out

        def decode_(latents):
            out = decode(latents)
            sync(device)
            return out

        pipe.encode_text, pipe.decode = encode_text, decode_
        return self

    def __exit__(self, *exc):
        if self.device.type != "cuda":
            return False
        for name, old in self._saved.items():
            if old is None:
                self.pipe.__dict__.pop(name, None)
            else:
                self.pipe.__dict__[name] = old
        return False


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(n: int | None):
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)

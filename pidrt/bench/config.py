"""What `pidrt bench` measures, as small frozen dataclasses (the CLI's argparse stops at the edge).

A run is: every backend in `backends` x every method variant (`variants()`: none, sca, ip and
eaa with each placement) x every batch size, `warmup` untimed generations then `iterations`
timed ones; the diffusers baseline for the methods diffusers implements; enrollment costs; the
flop count of each model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pidrt.errors import PidrtError
from pidrt.runtime.eaa_feed import PLACEMENTS
from pidrt.runtime.setup import RuntimeOptions

BACKENDS = ("torch", "fast", "ort", "trt")
METHODS = ("none", "sca", "ip", "eaa")
ENROLL_METHODS = ("sca", "ip", "eaa")
# Nominal H100 SXM dense fp16/bf16 tensor-core peak (no sparsity): the default on CUDA only.
H100_SXM_DENSE_FP16 = 989e12


def variant_name(method: str, placement: str | None = None) -> str:
    """'none', 'sca', 'ip', 'eaa:resident', ... (the key a case is reported under)."""
    return f"{method}:{placement}" if placement else method


def split_variant(variant: str) -> tuple[str, str | None]:
    method, _, placement = variant.partition(":")
    return method, (placement or None)


@dataclass(frozen=True)
class EnrollBenchConfig:
    """Enrollment costs: cache miss (built) and hit (read back) per method, EAA per resolution x steps."""

    enabled: bool = True
    methods: tuple[str, ...] = ENROLL_METHODS
    resolutions: tuple[int, ...] | None = None  # EAA image sides; None: the generation side
    steps: tuple[int, ...] | None = None  # EAA step counts; None: the generation step count
    iterations: int | None = None  # timed misses and hits; None: BenchConfig.iterations
    warmup: int = 1  # untimed misses first (detector and encoder first-call costs)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in ENROLL_METHODS]
        if bad:
            raise PidrtError(f"enrollment methods must be among {ENROLL_METHODS}; got {bad}")
        for name in ("resolutions", "steps"):
            values = getattr(self, name)
            if values is not None and (not values or any(v < 1 for v in values)):
                raise PidrtError(f"enroll {name} must be positive integers; got {values}")
        if self.iterations is not None and self.iterations < 1:
            raise PidrtError(f"enroll iterations must be >= 1; got {self.iterations}")
        if self.warmup < 0:
            raise PidrtError(f"enroll warmup must be >= 0; got {self.warmup}")


@dataclass(frozen=True)
class BenchConfig:
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # preset or real weights, adapters, device, dtype, seed
    backends: tuple[str, ...] = BACKENDS
    methods: tuple[str, ...] = METHODS
    eaa_placements: tuple[str, ...] = PLACEMENTS
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    steps: int = 30
    guidance: float = 7.5
    height: int | None = None  # None: the preset's resolution
    width: int | None = None
    scale: float = 0.8  # identity strength (lambda / sigma) of the identity elements
    prompt: str = "a portrait photo of a person"
    warmup: int = 1
    iterations: int = 5
    baseline: bool = True  # diffusers' eager StableDiffusionPipeline in the same run
    enroll: EnrollBenchConfig = field(default_factory=EnrollBenchConfig)
    flops: bool = True
    peak_flops: float | None = None  # None: H100_SXM_DENSE_FP16 on CUDA, no fraction on CPU
    threads: int | None = None  # torch intra-op threads and onnxruntime threads; None: their defaults
    engines: Path | None = None  # ort/trt: an export folder (pidrt export) holding every graph the run needs
    engine_cache: Path | None = None  # ort/trt without `engines`: the engine cache (None: ~/.cache/pidrt/engines)
    out_dir: Path = Path("benchmarks/results")
    name: str | None = None  # file stem; None: <cpu|cuda>-<preset>-<date>
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise PidrtError(f"backends must be among {BACKENDS}; got {list(self.backends)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise PidrtError(f"methods must be among {METHODS}; got {list(self.methods)}")
        bad = [p for p in self.eaa_placements if p not in PLACEMENTS]
        if bad or ("eaa" in self.methods and not self.eaa_placements):
            raise PidrtError(f"EAA placements must be among {PLACEMENTS}; got {list(self.eaa_placements)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise PidrtError(f"batch sizes must be positive; got {list(self.batch_sizes)}")
        if self.steps < 1 or self.iterations < 1 or self.warmup < 0:
            raise PidrtError(f"need steps >= 1, iterations >= 1, warmup >= 0; got {self.steps}, "
                             f"{self.iterations}, {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise PidrtError(f"threads must be >= 1; got {self.threads}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise PidrtError(f"peak flops must be positive; got {self.peak_flops}")

    def variants(self) -> list[str]:
        out = []
        for method in self.methods:
            if method == "eaa":
                out += [variant_name("eaa", p) for p in self.eaa_placements]
            else:
                out.append(method)
        return out

    def with_(self, **changes) -> BenchConfig:
        return replace(self, **changes)

    def as_json(self) -> dict:
        def clean(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

"""The fast GPU torch backend: fp16/bf16, channels_last, a measured SDPA backend, Triton identity
kernels (optionally fused GroupNorms) and CUDA graphs of the whole UNet step, behind the
reference `Pipeline`'s own interface.

    fast = make_fast(pipe, FastTorchConfig())      # a FastPipeline; `pipe` keeps working as it was
    fast.generate(SamplingConfig(...), [ImageSpec(...)])

`FastPipeline` is a `Pipeline` whose `unet(x, t, ctx)` (the only way `generate` and inversion
reach the UNet) runs the fast path. Everything else - text encoding, CFG batching, identity
payloads, EAA feeds, schedulers - is the reference code, so the two backends differ only in how
one UNet step is computed. Identities stay data (`BranchState` payloads), so one captured graph
serves every identity of a method and shape (`pidrt.engines.cuda_graphs`).

The base attention's SDPA backend ("auto") is chosen by timing the first UNet call of each
(batch, resolution, context) shape under each of cuDNN / flash / memory-efficient attention (and
xformers, when importable); the fastest is used for eager calls and baked into the graphs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pidrt.engines.cuda_graphs import Capturer, CudaGraphCapturer, GraphedUNet, as_timestep
from pidrt.errors import MissingDependencyError, PidrtError
from pidrt.models.build import Models
from pidrt.runtime.pipeline import Pipeline

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "xformers")
# Candidates "auto" times on a GPU, in the order ties go to (cuDNN usually wins on Hopper).
AUTO_CANDIDATES = ("cudnn", "flash", "efficient", "xformers")
# How far a candidate SDPA backend's UNet output may be from the default dispatch's (relative L2).
SDPA_RTOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}
# inductor's own CUDA graphs would nest inside ours (or replace them): not both.
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


@dataclass(frozen=True)
class FastTorchConfig:
    """How the fast backend runs the UNet. float32 is accepted for accuracy checks and CPU tests."""

    dtype: torch.dtype | str = torch.float16
    channels_last: bool = True
    kernels: bool = True  # Triton kernels for folded SCA/IP branches and EAA (BranchState.fused)
    # GroupNorm(+SiLU, + time embedding) as one Triton kernel that keeps channels_last
    # (pidrt.engines.fused_norms). Off until a GPU measurement shows a gain (bench_unet_step
    # --variants fused-norms); issue #5 item 3.
    fused_norms: bool = False
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the UNet (inside the graphs when cuda_graphs)
    compile_mode: str | None = None  # torch.compile mode; None = its default
    sdpa_backend: str = "auto"  # "auto" | "cudnn" | "flash" | "efficient" | "math" | "xformers"
    max_buckets: int = 8  # captured graphs kept (least recently used dropped first)

    def __post_init__(self):
        dtype = self.dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise PidrtError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
            object.__setattr__(self, "dtype", DTYPES[dtype])
        elif dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise PidrtError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise PidrtError(f"sdpa_backend must be one of {SDPA_BACKENDS}; got {self.sdpa_backend!r}")
        if self.max_buckets < 1:
            raise PidrtError(f"max_buckets must be >= 1; got {self.max_buckets}")
        if self.compile_mode is not None and not self.compile:
            raise PidrtError("compile_mode is set but compile is False")
        if self.compile and self.cuda_graphs and self.compile_mode in GRAPHING_COMPILE_MODES:
            raise PidrtError(f"torch.compile mode {self.compile_mode!r} captures its own CUDA graphs; "
                             "use cuda_graphs=False with it, or a mode without graphs "
                             "('default', 'max-autotune-no-cudagraphs')")

    def check_device(self, device: torch.device) -> None:
        """Clear errors for what cannot run on `device`, before any weight is moved."""
        cuda = device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise PidrtError(f"device {device} requested but torch sees no CUDA device")
        if self.cuda_graphs and not cuda:
            raise PidrtError(f"cuda_graphs=True needs a CUDA device; got {device}. Use cuda_graphs=False off-GPU")
        for flag in ("kernels", "fused_norms"):
            if not getattr(self, flag):
                continue
            if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise PidrtError(f"{flag}=True on {device} runs only in the Triton interpreter: set "
                                 f"TRITON_INTERPRET=1 before importing triton, or use {flag}=False")
            try:
                import triton  # noqa: F401
            except ImportError as exc:
                raise MissingDependencyError(f"{flag}=True needs Triton ({exc}): pip install 'pidrt[kernels]'") from exc
        if not cuda and self.sdpa_backend in ("cudnn", "efficient", "xformers"):
            raise PidrtError(f"sdpa_backend {self.sdpa_backend!r} needs a CUDA device; got {device}")
        if self.sdpa_backend == "xformers" and xformers_attention() is None:
            raise PidrtError("sdpa_backend 'xformers' but xformers is not importable: pip install xformers")


def xformers_attention() -> Callable | None:
    """xformers' memory-efficient attention ([B, N, H, d] layout), or None when not importable."""
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # noqa: BLE001 - a broken xformers build raises more than ImportError
        return None
    return memory_efficient_attention


class SDPAOverride(TorchFunctionMode):
    """Routes plain F.scaled_dot_product_attention calls ([B, H, N, d], no mask, no dropout, no
    custom scale) to `attention(q, k, v)` in [B, N, H, d] layout (xformers' convention).

    The processors call SDPA directly, so intercepting it at the torch-function level swaps the
    base attention without touching them (or the reference pipeline, which runs outside the mode).
    """

    def __init__(self, attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.attention = attention
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self._plain(args, kwargs):
            q, k, v = args[:3]
            self.calls += 1
            return self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return func(*args, **kwargs)

    @staticmethod
    def _plain(args, kwargs) -> bool:
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:])) | kwargs
        return (len(args) >= 3 and extra.get("attn_mask") is None and not extra.get("dropout_p")
                and not extra.get("is_causal") and extra.get("scale") is None and args[0].dim() == 4)


def attention_context(name: str | None):
    """The context that makes the base attention run on backend `name` (None: torch's own choice)."""
    if name is None:
        return contextlib.nullcontext()
    if name == "xformers":
        attention = xformers_attention()
        if attention is None:
            raise PidrtError("xformers is not importable")
        return SDPAOverride(attention)
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdp_backend(name)])


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of `fn` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pick_sdpa_backend(run: Callable[[str], object], candidates: Sequence[str],
                      timer: Callable[[Callable[[], object]], float],
                      validate: Callable[[object], str | None] | None = None,
                      ) -> tuple[str | None, dict[str, float | str]]:
    """Time `run(name)` for each candidate; (fastest, {name: ms or why it was not taken}).

    A backend that cannot serve the shapes (e.g. flash attention in float32) raises and is
    skipped; `validate(output)` may reject one whose output is off (a message, or None if fine).
    None when no candidate qualifies: torch's default dispatch is kept.
    """
    results: dict[str, float | str] = {}
    for name in candidates:
        try:
            problem = validate(run(name)) if validate is not None else None
            results[name] = f"rejected: {problem}" if problem else float(timer(lambda name=name: run(name)))
        except (RuntimeError, PidrtError, NotImplementedError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            results[name] = f"unavailable: {type(exc).__name__}: {first_line}"
    timed = {k: v for k, v in results.items() if isinstance(v, float)}
    return (min(timed, key=timed.get) if timed else None), results


def close_to(reference: torch.Tensor, rtol: float) -> Callable[[torch.Tensor], str | None]:
    """A `validate` for pick_sdpa_backend: relative L2 error against `reference` at most rtol."""
    ref = reference.float()

    def check(out: torch.Tensor) -> str | None:
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
        return None if err <= rtol else f"relative error {err:.2e} against torch's default dispatch"

    return check


class FastPipeline(Pipeline):
    """A `Pipeline` whose UNet step runs the fast backend (see the module docstring).

    capturer: the graph capture/replay mechanism; defaults to CUDA graphs when
    `config.cuda_graphs`. Tests inject `cuda_graphs.EagerCapturer` to run the bucket logic on CPU.
    """

    def __init__(self, models: Models, device: str | torch.device = "cuda", config: FastTorchConfig | None = None,
                 capturer: Capturer | None = None):
        config = config or FastTorchConfig()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        config.check_device(device)
        super().__init__(models, device, config.dtype)
        self.config = config
        unet = self.models.unet
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        if config.kernels:
            from pidrt.kernels.ops import TritonOps

            self.state.fused = TritonOps()
        self.norm_fusion = None
        if config.fused_norms:
            from pidrt.engines.fused_norms import fuse_group_norms

            self.norm_fusion = fuse_group_norms(unet)
        self.state.explicit_attention = False
        self._module = torch.compile(unet, mode=config.compile_mode, dynamic=False) if config.compile else unet
        self.sdpa_choice: dict[tuple, str | None] = {}
        self.sdpa_timings: dict[tuple, dict[str, float | str]] = {}
        self.sdpa_timer: Callable[[Callable[[], object]], float] = cuda_time_ms
        if capturer is None and config.cuda_graphs:
            capturer = CudaGraphCapturer(self.device)
        self.graphed = None if capturer is None else GraphedUNet(
            self._forward, self.state, capturer, channels_last=config.channels_last, max_buckets=config.max_buckets)

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        x, ctx = x.to(self.device, self.dtype), ctx.to(self.device, self.dtype)
        shape = self._shape_key(x, ctx)
        if shape not in self.sdpa_choice:
            self._choose_sdpa(shape, x, t, ctx)
        if self.graphed is not None:
            return self.graphed(x, t, ctx)
        out = self._forward(x, as_timestep(t, x.shape[0], self.device), ctx)
        # inductor's own graphs ("reduce-overhead") overwrite their outputs on the next call
        return out.clone(memory_format=torch.contiguous_format) if self.config.compile else out.contiguous()

    def _forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, module=None) -> torch.Tensor:
        """One UNet call on the fast path (also what the graphs record)."""
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with attention_context(self.sdpa_choice.get(self._shape_key(x, ctx))):
            return (module or self._module)(x, t, encoder_hidden_states=ctx).sample

    @staticmethod
    def _shape_key(x: torch.Tensor, ctx: torch.Tensor) -> tuple:
        return tuple(x.shape), tuple(ctx.shape)

    def auto_candidates(self) -> list[str]:
        """The SDPA backends "auto" times on this device."""
        if self.device.type != "cuda":
            return []  # CPU: torch's own dispatch (flash or math) is all there is
        return [c for c in AUTO_CANDIDATES if c != "xformers" or xformers_attention() is not None]

    def _choose_sdpa(self, shape: tuple, x, t, ctx) -> None:
        name = self.config.sdpa_backend
        if name != "auto":
            self.sdpa_choice[shape] = name
            return
        candidates = self.auto_candidates()
        if not candidates:
            self.sdpa_choice[shape] = None
            return
        t_full = as_timestep(t, x.shape[0], self.device)
        unet = self.models.unet  # eager even under compile: a trace must not happen per candidate

        def run(backend: str | None):
            self.sdpa_choice[shape] = backend
            return self._forward(x, t_full, ctx, module=unet)

        saved, saved_swap = self.state.record, self.state.swap
        # Timing calls must not add to an EAA recording or a retouch tap in progress.
        self.state.record, self.state.swap = None, {}
        try:
            # A backend must agree with torch's own choice before its speed counts.
            validate = close_to(run(None), SDPA_RTOL[self.dtype])
            best, timings = pick_sdpa_backend(run, candidates, self.sdpa_timer, validate)
        finally:
            self.state.record, self.state.swap = saved, saved_swap
        self.sdpa_choice[shape] = best
        self.sdpa_timings[shape] = timings

    def report(self) -> dict:
        """What the backend chose and did: config, SDPA choice and timings per shape, graph stats."""
        cfg = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(self.config).items()}
        return {
            "config": cfg,
            "device": str(self.device),
            "sdpa": [{"shape": list(map(list, s)), "choice": self.sdpa_choice[s], "timings_ms": self.sdpa_timings.get(s)}
                     for s in self.sdpa_choice],
            "graphs": None if self.graphed is None else self.graphed.stats.as_dict(),
            "fused_norms": None if self.norm_fusion is None else self.norm_fusion.as_dict(),
        }


def make_fast(pipe: Pipeline, config: FastTorchConfig | None = None, *, copy_models: bool = True,
              device: str | torch.device | None = None, capturer: Capturer | None = None) -> FastPipeline:
    """A FastPipeline on `pipe`'s models (and device, unless `device` is given).

    copy_models=True (default) works on a deep copy, so `pipe` stays the untouched reference.
    False hands the models over (no second copy in memory): they are converted in place and
    share the BranchState, so `pipe` must not be used afterwards.
    """
    config = config or FastTorchConfig()
    device = torch.device(device if device is not None else pipe.device)
    config.check_device(device)  # before paying for a copy
    models = copy.deepcopy(pipe.models) if copy_models else pipe.models
    return FastPipeline(models, device, config, capturer)

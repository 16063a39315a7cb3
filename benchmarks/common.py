"""Shared pieces of the pidrt benchmarks: CLI options, timing, run metadata, identities, JSON/markdown.

Timing on a GPU is `triton.testing.do_bench` (median; it flushes the L2 cache between runs) or,
without Triton, CUDA events. On CPU (smoke runs only) it is a perf_counter median.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from pidrt.fileio import atomic_write

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- CLI

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    p.add_argument("--preset", default="sd15", choices=["sd15", "tiny"],
                   help="model shapes (random weights; fine for timing). tiny is for CPU smoke runs")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs with --preset tiny only)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("fast backend (FastTorchConfig)")
    g.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs (default: on with CUDA)")
    g.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="Triton identity kernels (default: on with CUDA, or with TRITON_INTERPRET=1)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--fused-norms", action="store_true",
                   help="GroupNorm(+SiLU) as a Triton kernel pair (the candidate; off by default until measured)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (inside the graphs)")
    g.add_argument("--compile-mode", default=None)
    g.add_argument("--sdpa-backend", default="auto",
                   choices=["auto", "cudnn", "flash", "efficient", "math", "xformers"])


def refusal(args) -> str | None:
    """Why this run cannot go ahead here (a message for the user), or None."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ("this benchmark times a CUDA GPU and torch sees none. For a CPU smoke run of the "
                "script itself: --preset tiny --device cpu")
    if device.type == "cpu" and args.preset != "tiny":
        return f"--preset {args.preset} on CPU would take hours and time nothing useful; use --preset tiny --device cpu"
    if device.type not in ("cpu", "cuda"):
        return f"unsupported device {args.device!r}"
    return None


def dtype_of(args) -> torch.dtype:
    name = args.dtype or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def fast_config(args):
    from pidrt.engines.fast_torch import FastTorchConfig

    cuda = torch.device(args.device).type == "cuda"
    kernels = args.kernels if args.kernels is not None else (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    return FastTorchConfig(dtype=dtype_of(args), channels_last=args.channels_last, kernels=kernels,
                           fused_norms=args.fused_norms,
                           cuda_graphs=args.graphs if args.graphs is not None else cuda,
                           compile=args.compile, compile_mode=args.compile_mode, sdpa_backend=args.sdpa_backend)


# ---------------------------------------------------------------- timing and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median milliseconds of one call of `fn`."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _events_ms(fn, warmup_ms, rep_ms)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times, spent = [], 0.0
    while spent < rep_ms / 1e3 or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1e3 * statistics.median(times)


def _events_ms(fn, warmup_ms, rep_ms) -> float:
    from pidrt.engines.fast_torch import cuda_time_ms

    one = max(cuda_time_ms(fn, warmup=1, reps=1), 1e-3)  # size the run from one call
    return cuda_time_ms(fn, warmup=max(1, int(warmup_ms / one)), reps=max(5, int(rep_ms / one)))


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; returns the bytes allocated now (the baseline of the next peak)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def count_flops(fn: Callable[[], object]) -> int:
    """Flops torch's FlopCounterMode attributes to the aten ops of one call (Triton kernels: 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- metadata and output

def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def run_meta(device: torch.device, **extra) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        # A checkout copied without .git (the GPU machine's) names its commit in the environment.
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("PIDRT_GIT_COMMIT"),
        "git_dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        **extra,
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def failure(what: str, exc: BaseException) -> str:
    """One line on a failed measurement for the report; the traceback goes to stderr (the session log)."""
    import traceback

    print(f"{what} failed:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:300]


def write_outputs(out: str, payload: dict, markdown: str, echo: bool = True) -> tuple[Path, Path]:
    path = Path(out)
    stem = path.with_suffix("") if path.suffix in (".json", ".md") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{stem}.json"), Path(f"{stem}.md")
    # Atomic: scripts rewrite their report after every case, and a time limit may kill them mid-write.
    atomic_write(json_path, json.dumps(payload, indent=2, default=str).encode())
    atomic_write(md_path, markdown.encode())
    if echo:
        print(markdown)
        print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


# ---------------------------------------------------------------- identities (random weights, right shapes)

def few_token_conditions(models, layers, seed: int, ip_embed_dim: int = 1024):
    """Folded SCA and IP-Adapter identities (FoldedCondition, as enrollment stores them), plus the
    IP-Adapter weights and image embedding they came from (the diffusers baseline needs them).

    Call before the models move to the GPU: folding runs on CPU in float32, like enrollment.
    """
    from pidrt.models.adapters import IPAdapterWeights, SCAAdapter
    from pidrt.models.branches import IPIdentity, SCAIdentity, few_token_payloads, folded_of
    from pidrt.models.conditions import FoldedCondition

    dim = models.preset.unet.cross_attention_dim
    gen = torch.Generator().manual_seed(seed)
    sca = SCAAdapter.random(layers, dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=gen)
    ip = IPAdapterWeights.random(layers, dim, seed=seed + 1, embeddings_dim=ip_embed_dim)
    embed = torch.randn(1, ip_embed_dim, generator=gen)
    with torch.no_grad():
        tokens = {
            "sca": (SCAIdentity(sca, sca.mapping(w)[0]), SCAIdentity(sca, sca.mapping.unconditional()[0])),
            "ip": (IPIdentity(ip, ip.image_proj(embed)[0]), IPIdentity(ip, ip.image_proj(torch.zeros_like(embed))[0])),
        }
        conds = {}
        for method, (cond, uncond) in tokens.items():
            halves = [folded_of(few_token_payloads(models.unet, layers, [item])) for item in (cond, uncond)]
            conds[method] = FoldedCondition(method, "z" if method == "sca" else "x", *halves)
    return conds, ip, embed


def cfg_payloads(cond, device, dtype) -> dict:
    """A FoldedCondition as the payloads of a CFG batch [uncond, cond] (what `generate` builds)."""
    from pidrt.models.attention import FoldedLayer
    from pidrt.models.folded import stack_folded

    return {name: FoldedLayer(cond.query, stack_folded([cond.uncond[name], cond.cond[name]]).to(device, dtype))
            for name in cond.cond}


def random_eaa_payloads(layers, preset, height: int, width: int, batch: int, s_c: int, device, dtype,
                        seed: int = 0) -> dict:
    """EAA K/V of the right shapes (cached inversion features): self layers see the layer's own
    token count, cross layers s_c aggregated tokens."""
    from pidrt.models.adapters import layer_level
    from pidrt.models.attention import EAAKV

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_levels = len(preset.unet.block_out_channels)
    lh, lw = height // preset.latent_scale, width // preset.latent_scale
    out = {}
    for layer in layers:
        level = layer_level(layer.name, n_levels)
        m = (lh >> level) * (lw >> level) if layer.kind == "self" else s_c
        k, v = (torch.randn(batch, m, layer.channels, generator=gen) for _ in range(2))
        out[layer.name] = EAAKV(k.to(device, dtype), v.to(device, dtype))
    return out

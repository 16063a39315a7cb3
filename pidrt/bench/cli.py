"""`pidrt bench`: argparse at the edge, a frozen `BenchConfig` inside.

    pidrt bench --preset tiny --steps 10 --iterations 3 --out benchmarks/results
    pidrt bench --model /models/sd15 --ip-adapter ip.safetensors ... --device cuda --dtype float16
    pidrt bench --render benchmarks/results/cpu-tiny-2025-01-01.json     # markdown + plots again

`add_bench_parser(subparsers)` registers the subcommand on pidrt's CLI; `main()` is the same
command standalone (benchmarks/run_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pidrt.argtypes import HelpFormatter
from pidrt.errors import PidrtError

EXAMPLES = """examples:
  pidrt bench --preset tiny --steps 10 --iterations 3 --out benchmarks/results
  pidrt bench --render benchmarks/results/cpu-tiny-2025-01-01.json   # markdown + plots again"""


class HelpFormat(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults on every option's line; the examples kept as written."""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from pidrt.bench.config import BACKENDS, ENROLL_METHODS, METHODS
    from pidrt.runtime.eaa_feed import PLACEMENTS

    from pidrt.runtime.setup import add_runtime_arguments

    add_runtime_arguments(p.add_argument_group("models (as pidrt enroll / serve)"))

    g = p.add_argument_group("what to time")
    g.add_argument("--backends", "--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="backends to time side by side (the names pidrt serve --backend takes)")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="identity methods to time")
    g.add_argument("--eaa-placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS),
                   help="where EAA's cached features live during a generation")
    g.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8], help="images per generation")
    g.add_argument("--steps", type=int, default=30, help="sampling steps per generation")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--height", type=int, help="default: the preset's resolution")
    g.add_argument("--width", type=int, help="default: the preset's resolution")
    g.add_argument("--scale", type=float, default=0.8, help="identity strength of the identity elements")
    g.add_argument("--warmup", type=int, default=1, help="untimed generations per case")
    g.add_argument("--iterations", type=int, default=5, help="timed generations per case")
    g.add_argument("--no-baseline", action="store_true", help="skip diffusers' StableDiffusionPipeline")
    g.add_argument("--no-flops", action="store_true", help="skip counting flops")
    g.add_argument("--peak-flops", type=float,
                   help="device peak flop/s for the %% of peak (default on CUDA: 989e12, the nominal H100 SXM "
                        "dense fp16 figure; on CPU only achieved GFLOP/s unless given)")
    g.add_argument("--threads", type=int, help="torch intra-op and onnxruntime threads (default: theirs)")
    g.add_argument("--engines", type=Path, help="ort/trt: an export folder from `pidrt export` with every graph "
                   "the run needs (default: the engine cache)")
    g.add_argument("--engine-cache", type=Path, help="engine cache folder for ort/trt (default: ~/.cache/pidrt/engines)")

    g = p.add_argument_group("enrollment costs")
    g.add_argument("--no-enroll", action="store_true", help="skip timing enrollment")
    g.add_argument("--enroll-methods", nargs="+", choices=ENROLL_METHODS, default=list(ENROLL_METHODS),
                   help="enrollment methods to time")
    g.add_argument("--enroll-resolutions", nargs="+", type=int, help="EAA image sides (default: the generation's)")
    g.add_argument("--enroll-steps", nargs="+", type=int, help="EAA step counts (default: --steps)")
    g.add_argument("--enroll-iterations", type=int, help="default: --iterations")

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, markdown and plots")
    g.add_argument("--name", help="file stem (default: <cpu|cuda>-<preset>-<date>)")
    g.add_argument("--no-plots", action="store_true", help="skip the plots")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.add_argument("--render", type=Path, metavar="JSON", help="only re-render the markdown and plots of a saved result")


def config_from_args(a: argparse.Namespace):
    from pidrt.bench.config import BenchConfig, EnrollBenchConfig
    from pidrt.runtime.setup import runtime_options_from_args

    runtime = runtime_options_from_args(a)
    enroll = EnrollBenchConfig(enabled=not a.no_enroll, methods=tuple(a.enroll_methods),
                               resolutions=tuple(a.enroll_resolutions) if a.enroll_resolutions else None,
                               steps=tuple(a.enroll_steps) if a.enroll_steps else None,
                               iterations=a.enroll_iterations)
    return BenchConfig(runtime=runtime, backends=tuple(a.backends), methods=tuple(a.methods),
                       eaa_placements=tuple(a.eaa_placements), batch_sizes=tuple(a.batch_sizes), steps=a.steps,
                       guidance=a.guidance, height=a.height, width=a.width, scale=a.scale, warmup=a.warmup,
                       iterations=a.iterations, baseline=not a.no_baseline, enroll=enroll, flops=not a.no_flops,
                       peak_flops=a.peak_flops, threads=a.threads, engines=a.engines,
                       engine_cache=a.engine_cache, out_dir=a.out,
                       name=a.name, plots=not a.no_plots, progress=not a.no_progress)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.render is not None:
        from pidrt.bench.report import render

        if not a.render.is_file():
            raise PidrtError(f"{a.render}: no such result file")
        print(json.dumps(render(a.render, plots=not a.no_plots, log=lambda m: print(m, file=sys.stderr)), indent=2))
        return 0
    from pidrt.bench.harness import run_bench

    result = run_bench(config_from_args(a), log=lambda m: print(m, file=sys.stderr))
    counts: dict[str, int] = {}
    for case in result["cases"]:
        counts[case["status"]] = counts.get(case["status"], 0) + 1
    print(json.dumps({"files": result.get("files"), "cases": counts, "elapsed_s": round(result["elapsed_s"], 1)},
                     indent=2))
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `pidrt bench` on pidrt's subparsers (its handler is `args.func`)."""
    summary = "time every backend x method x batch size against diffusers; writes JSON, markdown and plots"
    p = subparsers.add_parser("bench", help=summary, description=summary, epilog=EXAMPLES,
                              formatter_class=HelpFormat)
    _add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_bench", description="side-by-side benchmark (pidrt bench)",
                                     epilog=EXAMPLES, formatter_class=HelpFormat)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args)
    except PidrtError as exc:
        print(f"pidrt bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The kernels compiled to cubin and written out as a C++ source: the CMake step of pidrt_kernels.

``cmake --build`` runs ``python -m pidrt.kernels.embed --arch 90 --dtype float16 --preset sd15
--out kernels_generated.cpp`` (docs/native.md). For every architecture and dtype it compiles each
kernel variant the presets' UNets launch (`pidrt.kernels.catalog`; variants that compile to the
same code, e.g. the few-token tiles of presets with equal heads, once) through the kernels' own
TensorRT launch plans (`Launch.compile`, no GPU needed), and writes the cubins with what the C
launcher needs to reproduce each plan: the tile sizes its grid is made of, the number of
parameters (Triton appends null scratch pointers) and the runtime parameter order, which the
generated source checks against the launcher's with a static_assert.

Cubin, not PTX: a driver loads a cubin for its architecture as it is, whatever PTX ISA the
compiler wrote (a CUDA 13.0 driver JIT-compiles PTX only up to ISA 9.0; Triton 3.9 writes 9.4).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from pidrt.errors import PidrtError

DTYPES = {"float32": "PIDRT_FLOAT32", "float16": "PIDRT_FLOAT16", "bfloat16": "PIDRT_BFLOAT16"}
# Which plan constants make a kernel's grid: (rows per program, output columns per chunk).
GRID_BLOCKS = {"few_token": ("BLOCK_N", "BLOCK_C"), "dual_kv": ("BLOCK_M", None)}


@dataclass(frozen=True)
class Job:
    """One variant for one architecture and dtype, named so a worker process can rebuild its plan."""

    arch: int
    dtype: str
    preset: str
    label: str

    def launch(self):
        import torch

        variant = next(v for v in _plugin_variants(self.preset) if v.label == self.label)
        return variant, variant.build(getattr(torch, self.dtype))


def _embeds(variant, dtype: str) -> bool:
    """Whether the library holds `variant` in `dtype`: the dtypes its plan runs in, and bf16 wherever
    fp16 runs (TensorRT's plugins take no bf16, but C callers do; a bf16 plan tiles as fp16's)."""
    runs = {str(d).removeprefix("torch.") for d in variant.dtypes}
    return dtype in runs or (dtype == "bfloat16" and "float16" in runs)


@functools.lru_cache(maxsize=None)  # asked for each variant and dtype
def _plugin_variants(preset: str) -> list:
    """The launch plans of `preset` that the library embeds: the TensorRT plugins' (the JIT forms
    are what Triton's own launcher compiles at run time; the catalog checks them apart)."""
    from pidrt.kernels.catalog import plugin_variants
    from pidrt.models.presets import get_preset

    return plugin_variants(get_preset(preset))


def plan_jobs(presets: list[str], dtypes: list[str], archs: list[int], only: list[str] | None = None) -> list[Job]:
    """Every distinct compile: a variant's code depends only on its kernel and compile-time constants.

    `only` keeps the variants with these labels (e.g. "dual_kv d=40"), for a smaller library.
    """
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise PidrtError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    labels = {v.label for preset in presets for v in _plugin_variants(preset)}
    unknown = sorted(set(only or ()) - labels)
    if unknown:
        raise PidrtError(f"no variants {unknown} in presets {presets}; they have {sorted(labels)}")
    jobs, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for preset in presets:
                for variant in _plugin_variants(preset):
                    if (only and variant.label not in only) or not _embeds(variant, dtype):
                        continue
                    job = Job(arch, dtype, preset, variant.label)
                    constants = sorted((k, repr(v)) for k, v in job.launch()[1].constexprs.items())
                    key = (arch, dtype, variant.kernel, tuple(constants))
                    if key not in seen:
                        seen.add(key)
                        jobs.append(job)
    return jobs


def compile_job(job: Job) -> dict:
    """Compile one job (in a worker process): the cubin and every number the C table holds."""
    from pidrt.kernels import few_token

    variant, launch = job.launch()
    compiled = launch.compile(job.arch)
    params = compiled.ptx_params()
    runtime = [*launch.inputs, *launch.scalars, launch.output]
    if len(params) < len(runtime) or any(".ptr" not in p for p in params[len(runtime):]):
        # The launcher passes null for trailing parameters: only Triton's scratch pointers may trail.
        raise PidrtError(f"{job.label}: compiled parameters {params} are not the plan's {runtime} + pointers")
    rows, cols = GRID_BLOCKS[variant.kernel]
    return {
        "kind": variant.kernel, "label": variant.label, "arch": job.arch, "dtype": job.dtype,
        "heads_padded": launch.constexprs.get("HP", 0), "tokens_padded": launch.constexprs.get("NP", 0),
        "head_dim": launch.scalars["D"] if variant.kernel == "dual_kv" else 0,
        "block_rows": launch.constexprs[rows], "block_cols": launch.constexprs[cols] if cols else 0,
        "chunks_cap": few_token.PLUGIN_CHUNKS_PER_PROGRAM if variant.kernel == "few_token" else 0,
        "num_warps": compiled.num_warps, "shared_bytes": compiled.shared_bytes, "num_params": len(params),
        "function": compiled.name, "params": ",".join(runtime), "cubin": compiled.cubin,
    }


def compile_all(jobs: list[Job], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [compile_job(job) for job in jobs]
    # spawn: a forked child would inherit torch's thread pools mid-state.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(compile_job, jobs))


def _literal(data: bytes, width: int = 48) -> str:
    """Bytes as adjacent C string literals of hex escapes (one is followed only by \\ or ")."""
    return "\n".join('    "' + "".join(f"\\x{b:02x}" for b in data[i:i + width]) + '"'
                     for i in range(0, len(data), width))


def cpp_source(rows: list[dict], build_info: str) -> str:
    kinds = {"few_token": "kFewTokenParams", "dual_kv": "kDualKvParams"}
    out = [f"// Generated by pidrt.kernels.embed ({build_info}): do not edit.", '#include "table.h"', "",
           "namespace pidrt {", ""]
    for kind, params in sorted({(r["kind"], r["params"]) for r in rows}):
        out.append(f'static_assert(same_text({kinds[kind]}, "{params}"),\n'
                   f'              "{kind}: the compiled kernel\'s parameters differ from the launcher\'s order");')
    out.append("")
    for i, r in enumerate(rows):
        out += [f"// {r['label']}, sm_{r['arch']}, {r['dtype']}", f"static char const kCubin{i}[] =",
                _literal(r["cubin"]) + ";"]
    out += ["", "Entry const kEntries[] = {"]
    for i, r in enumerate(rows):
        info = (f'"{r["kind"]}", "{r["label"]}", {r["arch"]}, {DTYPES[r["dtype"]]}, {r["heads_padded"]}, '
                f'{r["tokens_padded"]}, {r["head_dim"]}, {r["num_warps"]}, {r["shared_bytes"]}, {len(r["cubin"])}')
        out.append(f'    {{Kind::{r["kind"]}, {{{info}}}, {r["block_rows"]}, {r["block_cols"]}, {r["chunks_cap"]}, '
                   f'{r["num_params"]}, "{r["function"]}", kCubin{i}}},')
    out += ["};", f"int32_t const kEntryCount = {len(rows)};", f'char const kBuildInfo[] = "{build_info}";', "",
            "}  // namespace pidrt", ""]
    return "\n".join(out)


def build_info(presets: list[str], dtypes: list[str], archs: list[int], only: list[str]) -> str:
    import triton

    import pidrt

    info = (f"pidrt {pidrt.__version__}; triton {triton.__version__}; presets {','.join(presets)}; "
            f"archs {','.join(map(str, archs))}; dtypes {','.join(dtypes)}")
    return info + (f"; only {','.join(only)}" if only else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pidrt.kernels.embed", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", required=True, help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", default=["float16"], choices=sorted(DTYPES))
    parser.add_argument("--preset", nargs="+", default=["sd15"])
    parser.add_argument("--variant", nargs="*", default=[], help="only these labels, e.g. 'dual_kv d=40'")
    parser.add_argument("--out", type=Path, required=True, help="the C++ source to write")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    a = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("embed: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    try:
        jobs = plan_jobs(a.preset, a.dtype, a.arch, a.variant)
        print(f"embed: compiling {len(jobs)} kernels with {min(a.jobs, len(jobs))} processes", file=sys.stderr)
        source = cpp_source(compile_all(jobs, a.jobs), build_info(a.preset, a.dtype, a.arch, a.variant))
    except PidrtError as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return 2
    from pidrt.fileio import atomic_write

    atomic_write(a.out, source.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one UNet step per identity method, reference torch path vs the fast backend (GPU).

    python benchmarks/bench_unet_step.py --out benchmarks/results/unet_step_h100
    python benchmarks/bench_unet_step.py --out /tmp/smoke --preset tiny --device cpu   # smoke run

SD1.5 shapes with random weights (build_random(SD15): the timing does not depend on the
values), 512x512, classifier-free guidance batch 2, fp16. Cases: the base UNet; + SCA and
+ IP-Adapter (folded identities, both CFG halves active); + EAA (cached features: random K/V of
the right shapes, s_c aggregated tokens for cross-attention). Each case runs on
- `reference`: `Pipeline.unet`, eager, torch's default SDPA, the folded branch in plain torch;
- `fast`: `make_fast` (fp16, channels_last, measured SDPA backend, Triton kernels, CUDA graphs),
  and with `--variants` also the fast backend with one choice changed (VARIANTS), side by side.
Medians from triton.testing.do_bench; ratios are to the base step of the same backend measured
in the same run. Targets: SCA / IP-Adapter add < 3% over base, EAA < 30%.
Writes <out>.json (metadata, medians, ratios, errors, the backend's choices) and <out>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGETS = {"sca": 1.03, "ip": 1.03, "eaa": 1.30}  # step time / base step time
# --variants: the fast backend as configured on the command line ("fast"), and with one choice
# changed, measured side by side in the same run to see what each choice is worth.
VARIANTS = {
    "fast": {},
    "no-kernels": {"kernels": False},  # branches in torch: EAA as two SDPA calls of the chosen backend
    "nchw": {"channels_last": False},
    "fused-norms": {"fused_norms": True},  # the GroupNorm(+SiLU) kernel: item 3's candidate, off by default
    "no-graphs": {"cuda_graphs": False},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the preset's resolution)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--scale", type=float, default=0.6, help="branch scale of every element")
    p.add_argument("--eaa-sc", type=int, default=256, help="EAA aggregated cross-attention tokens s_c")
    p.add_argument("--timestep", type=int, default=501)
    p.add_argument("--warmup", type=float, default=100, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=500, help="do_bench repetition time, ms")
    p.add_argument("--cases", default="base,sca,ip,eaa")
    p.add_argument("--variants", default="fast",
                   help=f"comma-separated fast-backend variants to time side by side: {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true",
                   help="also profile the fast backend's step per case (torch.profiler, top kernels by "
                        "self device time): where the time goes, to pick what to fuse next")
    p.add_argument("--profile-top", type=int, default=15)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    why = common.refusal(args)
    if why:
        print(f"bench_unet_step.py: {why}", file=sys.stderr)
        return 2
    import torch

    from pidrt.engines.fast_torch import make_fast
    from pidrt.models.attention import attention_layers
    from pidrt.models.build import build_random
    from pidrt.models.presets import get_preset
    from pidrt.runtime.pipeline import Pipeline

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), common.dtype_of(args)
    preset = get_preset(args.preset)
    height, width = args.height or preset.resolution, args.width or preset.resolution
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = (set(cases) - {"base", "sca", "ip", "eaa"}) | (set(variants) - set(VARIANTS))
    if unknown or not variants:
        print(f"bench_unet_step.py: unknown cases or variants {sorted(unknown)} (variants: {', '.join(VARIANTS)})",
              file=sys.stderr)
        return 2

    models = build_random(preset, seed=args.seed)
    layers = attention_layers(models.unet)
    conds, _, _ = common.few_token_conditions(models, layers, args.seed)
    reference = Pipeline(models, device, dtype)
    base_config = common.fast_config(args)
    # A variant that fails (to build, or on its first step: a kernel that does not compile on this
    # GPU) is reported as failed and the run goes on: one lease should bring back the others.
    fast, failed = {}, {}
    for v in variants:
        try:
            fast[v] = make_fast(reference, dataclasses.replace(base_config, **VARIANTS[v]))
        except Exception as exc:  # noqa: BLE001 - any failure of one variant
            failed[v] = common.failure(f"variant {v}", exc)

    b, dim = args.batch, preset.unet.cross_attention_dim
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(b, 4, height // preset.latent_scale, width // preset.latent_scale, generator=gen).to(device, dtype)
    ctx = torch.randn(b, 77, dim, generator=gen).to(device, dtype)
    t = torch.tensor(args.timestep)  # a 0-dim CPU int64, as the schedulers hand it to Pipeline.unet

    def payloads(case: str) -> dict:
        if case == "base":
            return {}
        if case == "eaa":
            return common.random_eaa_payloads(layers, preset, height, width, b, args.eaa_sc, device, dtype, args.seed)
        if b % 2:
            raise SystemExit("--batch must be even for the few-token cases (CFG pairs)")
        one = common.cfg_payloads(conds[case], device, dtype)
        return {n: type(p)(p.query, _repeat(p.branch, b // 2)) for n, p in one.items()}

    run = common.run_meta(device, preset=preset.name, height=height, width=width, batch=b, dtype=str(dtype),
                          scale=args.scale, eaa_s_c=args.eaa_sc, timestep=args.timestep, variants=variants,
                          timing="triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median")

    def write(final: bool) -> None:
        """The report of the cases so far: written after every case, so a run cut short keeps them."""
        rows, table = [], []
        names = ["reference", *variants]
        base = results.get("base")
        for case, r in results.items():
            ratio = {k: (r[k] / base[k] if base and r[k] and base[k] else None) for k in names}
            target = TARGETS.get(case)
            row = {"case": case, "ms": {k: r[k] for k in names}, "ratio_to_base": ratio,
                   "speedup_vs_reference": {v: r["reference"] / r[v] if r[v] else None for v in variants},
                   "flops_per_step": flops[case], "target_ratio": target,
                   "target_met": {k: (ratio[k] < target if target and ratio[k] else None) for k in names},
                   "vs_reference": errors[case]}
            rows.append(row)
            met = row["target_met"][variants[0]]
            table.append([case, r["reference"], _ratio(ratio["reference"]),
                          *(x for v in variants for x in (r[v] or "failed", _ratio(ratio[v]))),
                          f"< {100 * (target - 1):.0f}%: {'met' if met else 'NOT met'}" if target and met is not None
                          else "", flops[case] / 1e12, errors[case][variants[0]].get("rel_l2", "failed")])

        meta = {**run, "complete": final, "failed": failed}
        reports = {v: fast[v].report() if v in fast else {"failed": failed[v]} for v in variants}
        first = reports[variants[0]]
        md = "\n".join([
            f"# UNet step: {meta['device']}, {preset.name} {height}x{width}, batch {b}, {str(dtype).removeprefix('torch.')}"
            f"{'' if final else ' (INCOMPLETE: the run stopped early)'}",
            "",
            f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}, "
            f"{meta['date']}. Medians in ms ({meta['timing']}); overhead = step / base step of the same backend, "
            "same run. Random weights. reference = Pipeline.unet (eager torch); "
            + "; ".join(f"{v} = make_fast ({_describe(reports[v]['config']) if v in fast else 'failed'})"
                    for v in variants) + ".",
            "",
            common.md_table(["case", "reference ms", "reference overhead",
                             *(x for v in variants for x in (f"{v} ms", f"{v} overhead")),
                             f"target ({variants[0]})", "TFLOP/step", f"rel err {variants[0]}"], table),
            "",
            *(f"FAILED {v}: {why}" for v, why in failed.items()),
            f"SDPA backend chosen by {variants[0]}: {_sdpa(first) if 'sdpa' in first else 'failed'}.",
            f"CUDA graphs ({variants[0]}): {first.get('graphs', 'failed')}.",
            "",
            *(_profile_md(variants[0], case, top) for case, top in profiles.items()),
        ])
        common.write_outputs(args.out, {"meta": meta, "rows": rows, "fast_backend": reports, "profiles": profiles}, md,
                             echo=final)

    results, flops, profiles, errors = {}, {}, {}, {}
    for case in cases:
        layers_payload = payloads(case)
        outs = {}
        results[case] = {v: None for v in variants}
        for name, pipe in (("reference", reference), *((v, fast[v]) for v in variants if v not in failed)):
            pipe.state.layers = layers_payload
            pipe.state.scale = torch.full((b,), 0.0 if case == "base" else args.scale, device=device, dtype=dtype)
            step = lambda pipe=pipe: pipe.unet(x, t, ctx)  # noqa: E731
            try:
                outs[name] = step().float()  # first call: SDPA choice and graph capture happen here
                results[case][name] = common.median_ms(step, device, args.warmup, args.rep)
                if name == "reference":
                    flops[case] = common.count_flops(step)
                elif args.profile and name == variants[0]:
                    profiles[case] = _profile(step, device, args.profile_top)
            except Exception as exc:  # noqa: BLE001 - see `failed` above; the reference must work
                if name == "reference":
                    raise
                failed[name] = f"{case}: {common.failure('variant ' + name, exc)}"
                outs.pop(name, None)
                results[case][name] = None
            finally:
                pipe.state.clear()
        want = outs["reference"]
        errors[case] = {v: {"rel_l2": float((outs[v] - want).norm() / want.norm().clamp_min(1e-12)),
                            "max_abs": float((outs[v] - want).abs().max()),
                            "finite": bool(torch.isfinite(outs[v]).all())} if v in outs else {"failed": failed[v]}
                        for v in variants}
        print(f"{case}: " + ", ".join(f"{k} {v:.3f} ms" if v else f"{k} failed" for k, v in results[case].items()),
              file=sys.stderr)
        write(final=False)
    write(final=True)
    return 0


def _profile(step, device, top: int, steps: int = 5) -> list[dict]:
    """The kernels of `steps` calls with the largest device time (on CPU: host ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        common.sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    if cuda:  # the kernels themselves: an op's device time is its kernels' again
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    events = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"name": e.key, "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total} for e in events[:top] if getattr(e, key) > 0]


def _profile_md(variant: str, case: str, top: list[dict]) -> str:
    rows = [[e["name"][:90], e["calls_per_step"], e["ms_per_step"], f"{100 * e['share']:.1f}%"] for e in top]
    return (f"Profile, {variant}, {case}: time per step of the top GPU kernels (on CPU: host ops), "
            "share of the profiled total:\n\n"
            + common.md_table(["op / kernel", "calls/step", "ms/step", "share"], rows) + "\n")


def _repeat(branch, n: int):
    """A CFG pair's branch repeated for n pairs (batch 2n)."""
    if n == 1:
        return branch
    from pidrt.models.folded import FoldedBranch

    cat = lambda t: t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
    return FoldedBranch(cat(branch.a), cat(branch.b), cat(branch.score_bias), cat(branch.out_bias), branch.n_tokens)


def _ratio(r) -> str:
    return "" if r is None else f"{100 * (r - 1):+.1f}%"


def _describe(cfg: dict) -> str:
    on = [k for k in ("channels_last", "kernels", "fused_norms", "cuda_graphs", "compile") if cfg.get(k)]
    return f"{cfg['dtype'].removeprefix('torch.')}, sdpa {cfg['sdpa_backend']}, " + ", ".join(on or ["no extras"])


def _sdpa(report: dict) -> str:
    parts = []
    for s in report["sdpa"]:
        timings = s["timings_ms"] or {}
        detail = ", ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items())
        parts.append(f"{s['shape']}: {s['choice'] or 'torch default'}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts) or "none"


if __name__ == "__main__":
    sys.exit(main())

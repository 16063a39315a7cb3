"""A benchmark result as files: <stem>.json (everything), <stem>.md (tables), <stem>-*.png (plots).

The markdown and the plots are rendered from the result dict alone, so a committed JSON can be
re-rendered (`pidrt bench --render results/<stem>.json`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REQUIRED_KEYS = ("schema", "date", "git", "device", "versions", "config", "sampling", "cases", "backends",
                 "baseline", "flops", "ratio_definitions", "notes")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def write_outputs(result: dict, out_dir: Path, stem: str, plots: bool = True, log=print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / f"{stem}.json"), "md": str(out_dir / f"{stem}.md"), "png": []}
    if plots:
        from pidrt.bench.plots import make_plots

        pngs, message = make_plots(result, out_dir, stem)
        files["png"] = [str(p) for p in pngs]
        if message:
            files["plots_skipped"] = message
            log(message)
    result["files"] = files
    Path(files["json"]).write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    Path(files["md"]).write_text(render_markdown(result, [Path(p).name for p in files["png"]]))
    return files


def render(json_path: Path, plots: bool = True, log=print) -> dict:
    """Re-render the markdown and plots of a saved result next to it."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    files = {"md": str(json_path.with_suffix(".md")), "png": []}
    if plots:
        from pidrt.bench.plots import make_plots

        pngs, message = make_plots(result, json_path.parent, json_path.stem)
        files["png"] = [str(p) for p in pngs]
        if message:
            log(message)
    Path(files["md"]).write_text(render_markdown(result, [Path(p).name for p in files["png"]]))
    return files


def _s(x: float | None) -> str:
    """Seconds, as ms below 1 s."""
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.3f} s"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _g(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e9:.3g}"


def _med(case: dict, stage: str) -> float | None:
    st = case.get("stages_s", {}).get(stage)
    return st.get("median") if st else None


def _ordered(cases: list[dict]) -> list[dict]:
    """By backend (diffusers first), then method variant and batch, in the order they were configured."""
    backends = ["diffusers"] + [b for b in dict.fromkeys(c["backend"] for c in cases) if b != "diffusers"]
    variants = list(dict.fromkeys(c["variant"] for c in cases))
    return sorted(cases, key=lambda c: (backends.index(c["backend"]), variants.index(c["variant"]), c["batch"]))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(result: dict, pngs: list[str] | None = None) -> str:
    dev, cfg, smp = result["device"], result["config"], result["sampling"]
    models = result.get("models", {})
    git = result.get("git", {})
    v = result["versions"]
    lines = [f"# pidrt bench: {dev.get('name')} ({dev.get('type')})", ""]
    commit = git.get("commit") or "unknown"
    lines += [
        f"- date: {result['date']}; git {commit[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- device: {dev.get('name')}" + (f" {dev.get('capability')}" if dev.get("capability") else "")
        + f"; {dev.get('cpu_count')} CPUs visible, torch threads {dev.get('torch_threads')}; load average "
        f"(1/5/15 min) {dev.get('load_average_start')} at start, {dev.get('load_average_end')} at end",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]),
        f"- models: preset `{models.get('preset')}`, weights `{models.get('weights')}`, {models.get('dtype')} "
        f"on {models.get('device')}",
        f"- sampling: {smp['steps']} {smp['scheduler']} steps, guidance {smp['guidance']}, {smp['height']}x{smp['width']}; "
        f"identity scale {cfg['scale']}",
        f"- runs: {cfg['warmup']} warm-up (excluded) + {cfg['iterations']} timed per case; batch sizes "
        f"{cfg['batch_sizes']}; mixed batches: {result.get('identities', {}).get('batch_pattern', '')}",
        f"- elapsed: {result.get('elapsed_s', 0):.0f} s", "",
    ]
    lines += ["## Backends", ""]
    rows = []
    for name, b in result["backends"].items():
        info = b.get("info", {})
        detail = b.get("reason") or ", ".join(f"{k} {info[k]}" for k in ("version", "dtype") if info.get(k))
        rows.append([name, "yes" if b["available"] else "no", detail.replace("|", "/")])
    if result["baseline"].get("methods"):
        detail = "; ".join(f"{m}: {r}" for m, r in result["baseline"]["methods"].items())
        rows.append(["diffusers (baseline)", "yes", detail.replace("|", "/")])
    lines += _table(["backend", "ran", "version / reason"], rows) + [""]

    peak_note = result["flops"].get("peak_note", "")
    has_peak = result["flops"].get("peak_flops") is not None
    ok = _ordered([c for c in result["cases"] if c.get("status") == "ok"])
    lines += ["## Generation", "",
              "Median seconds over the timed runs (p95 beside the total). Ratios are speedups: the reference's "
              "median total time / this case's (see the definitions below); all measured in this run.", ""]
    header = ["backend", "method", "B", "total", "p95", "text", "UNet loop", "VAE", "img/s", "peak mem",
              "vs diffusers", "vs diffusers none", "vs pidrt none", "vs torch none", "GFLOP/s"]
    if has_peak:
        header.append("% peak")
    rows = []
    for c in ok:
        r = c.get("ratios", {})
        fl = c.get("flops", {})
        row = [c["backend"], c["variant"], str(c["batch"]), _s(_med(c, "total_s")),
               _s(c["stages_s"]["total_s"].get("p95")), _s(_med(c, "text_encode_s")), _s(_med(c, "unet_loop_s")),
               _s(_med(c, "vae_decode_s")), f"{c['images_per_s']:.2f}" if c.get("images_per_s") else "-",
               _bytes(c.get("memory", {}).get("peak_bytes")), _x(r.get("vs_diffusers")),
               _x(r.get("vs_diffusers_none")), _x(r.get("vs_pidrt_none")), _x(r.get("vs_torch_none")),
               f"{fl['achieved_flop_s'] / 1e9:.2f}" if fl.get("achieved_flop_s") else "-"]
        if has_peak:
            row.append(f"{100 * fl['peak_fraction']:.2f}%" if fl.get("peak_fraction") else "-")
        rows.append(row)
    lines += _table(header, rows) + [""]
    mem_kinds = sorted({c.get("memory", {}).get("kind") for c in ok if c.get("memory")} - {None})
    if mem_kinds:
        lines += [f"Peak memory: {', '.join(mem_kinds)}.", ""]
    if peak_note:
        lines += [f"Flop rate: {peak_note}.", ""]

    not_ok = _ordered([c for c in result["cases"] if c.get("status") != "ok"])
    if not_ok:
        grouped: dict = {}
        for c in not_ok:
            key = (c["backend"], c["variant"], c["status"], c.get("reason", ""))
            grouped.setdefault(key, []).append(str(c["batch"]))
        lines += ["## Not run", ""]
        lines += _table(["backend", "method", "B", "status", "reason"],
                        [[b, v, ",".join(bs), s, r.replace("|", "/").replace("\n", " ")[:400]]
                         for (b, v, s, r), bs in grouped.items()]) + [""]

    lines += _flops_section(result)
    lines += _enroll_section(result.get("enrollment"))

    parity = result["baseline"].get("max_abs_diff_vs_torch") or {}
    others = result.get("max_abs_diff_vs_torch") or {}
    if parity or others:
        lines += ["## Same images", "", "Max abs difference of the images (in [0, 1]) against pidrt's torch "
                  "reference for the same batch:", ""]
        lines += _table(["what", "max abs diff"], [[f"diffusers {k}", f"{v:.2e}"] for k, v in parity.items()]
                        + [[k, f"{v:.2e}"] for k, v in others.items()]) + [""]

    lines += ["## Ratio definitions", ""] + [f"- `{k}`: {v}" for k, v in result["ratio_definitions"].items()] + [""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def _flops_section(result: dict) -> list[str]:
    flops = result.get("flops") or {}
    by_variant = flops.get("by_variant") or {}
    if not by_variant:
        return []
    lines = ["## Flops", "", f"Counted with {flops.get('counted_with', 'FlopCounterMode')}; GFLOP per call. "
             "A generation is text + steps x UNet call + VAE decode.", ""]
    rows = []
    for variant, per_batch in by_variant.items():
        for batch, c in per_batch.items():
            if "generation" not in c:
                rows.append([variant, batch, "-", "-", "-", "-", c.get("reason", "")])
                continue
            rows.append([variant, batch, f"{_g(c['unet_call'])} (batch {c['unet_batch']})", _g(c["text_encoder"]),
                         _g(c["vae_decoder"]), _g(c["generation"]), ""])
    lines += _table(["method", "B", "UNet call", "text encoder", "VAE decoder", "generation", "note"], rows) + [""]
    base = flops.get("diffusers_unet_call") or {}
    if base:
        lines += ["diffusers' UNet call at B=1 (CFG batch 2): " + ", ".join(
            f"{m} {_g(c.get('unet_call'))} GFLOP" for m, c in base.items() if isinstance(c, dict)) + ".", ""]
    return lines


def _enroll_section(enroll: dict | None) -> list[str]:
    if not enroll:
        return []
    lines = ["## Enrollment", "",
             f"Cache miss (artifact built) and hit (read back), median seconds; stages of a miss (median; "
             f"`other`: the rest of `Enroller.enroll`, i.e. key hashing of photos, adapter and encoder weights, "
             f"serialisation and the store's write). "
             f"Base-weights fingerprint, once per process: {_s(enroll.get('base_fingerprint_s'))}.", ""]
    rows = []
    for p in enroll.get("points", []):
        stages = ", ".join(f"{k} {_s(v.get('median'))}" for k, v in p["stages_s"].items())
        rows.append([p["method"], str(p["resolution"] or "-"), str(p["steps"] or "-"), _s(p["miss_s"]["median"]),
                     _s(p["miss_s"]["p95"]), _s(p["hit_s"]["median"]), _x(p.get("hit_speedup")),
                     _bytes(p.get("artifact_bytes")), stages])
    lines += _table(["method", "resolution", "steps", "miss", "miss p95", "hit", "miss/hit", "artifact", "miss stages"],
                    rows) + [""]
    for s in enroll.get("skipped", []):
        lines.append(f"- not run: {s['method']} {s.get('resolution') or ''} {s.get('steps') or ''}: {s['reason']}")
    return lines + ([""] if enroll.get("skipped") else [])

"""The numbers and tables of `serve_load.py`: percentiles, one load phase's summary, the markdown.

A load phase is a list of per-request records (status, latency, batch, timings) from either the
HTTP server or the bare Generator; both are summarized the same way so their ratio compares like
with like.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def metric_histogram(text: str, name: str) -> dict[str, float]:
    """Per-bucket counts (not cumulative) of a Prometheus histogram without labels."""
    cumulative = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.M):
        cumulative.append((m.group(1), float(m.group(2))))
    out, prev = {}, 0.0
    for le, count in cumulative:
        if count - prev:
            out[le.replace(".0", "") if le != "+Inf" else le] = count - prev
        prev = count
    return out


def process_memory(pid: int) -> dict[str, float | None]:
    """Peak and current resident set of a process in MiB (Linux /proc; None elsewhere)."""
    out: dict[str, float | None] = {"peak_rss_mib": None, "rss_mib": None}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for key, name in (("VmHWM", "peak_rss_mib"), ("VmRSS", "rss_mib")):
        m = re.search(rf"^{key}:\s+(\d+) kB$", status, re.M)
        if m:
            out[name] = round(int(m.group(1)) / 1024, 1)
    return out


def summarize(results: list[dict], elapsed: float, n: int) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    lat = [r["latency_s"] for r in ok]
    batches = {}
    for r in ok:
        batches[(r.get("replica"), r["batch"]["id"])] = r["batch"]["images"]
    stage = {}
    for name in ("queue_s", "unet_loop_s", "vae_decode_s", "encode_s", "total_s"):
        vals = [r["timings"][name] for r in ok if name in r["timings"]]
        stage[name] = {"p50": percentile(vals, 0.5), "p95": percentile(vals, 0.95)}
    return {
        "requests": len(results),
        "answered_exactly_once": all(r["answers"] == 1 for r in results),
        "answers": dict(Counter(str(r.get("status")) for r in results)),
        "errors": dict(Counter(r["error"] for r in results if r.get("error"))),
        "seeds_reported_correctly": all(r.get("seeds_ok", False) for r in ok),
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(ok) / elapsed, 3) if elapsed else None,
        "images_per_s": round(len(ok) * n / elapsed, 3) if elapsed else None,
        "latency_s": {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95), "p99": percentile(lat, 0.99),
                      "max": max(lat) if lat else None, "mean": statistics.fmean(lat) if lat else None},
        "stage_s": stage,
        "batch_size_histogram": dict(sorted(Counter(batches.values()).items())),
    }


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def markdown(report: dict) -> str:
    c, host = report["config"], report["host"]
    lines = [
        "# pidrt serve load: served vs bare Generator",
        "",
        f"Device: {host['device']} ({host['cpus']} CPUs, torch {host['torch']}), {report['date']}, "
        f"commit {host.get('git_commit') or 'unknown'}; load average at start / end "
        f"{host.get('load_average_start')} / {host.get('load_average_end')}.",
        f"{c['requests']} requests, {c['concurrency']} in flight, {c['identities']} IP identities + none in rotation, "
        f"{c['size']}x{c['size']}, {c['steps']} steps, n={c['n']}, max_batch={c['max_batch']}, "
        f"max_wait_ms={c['max_wait_ms']}, preset {c['preset']}. Each backend: the HTTP server (its own process) "
        "under the load, then the bare Generator in this process with the same requests and concurrency.",
        "",
        "| backend | served images/s | bare images/s | served / bare | served p50 / p95 s | bare p50 / p95 s | "
        "server peak / end RSS MiB | torch weights held MiB | ready after s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in report["backends"].items():
        s, bare = b.get("served") or {}, b.get("bare") or {}
        sl, bl = s.get("latency_s", {}), bare.get("latency_s", {})
        torch_mib = b.get("torch_bytes")
        lines.append(
            f"| {name} | {_f(s.get('images_per_s'))} | {_f(bare.get('images_per_s'))} | "
            f"{_f(_ratio(s.get('images_per_s'), bare.get('images_per_s')))} | {_f(sl.get('p50'))} / {_f(sl.get('p95'))} | "
            f"{_f(bl.get('p50'))} / {_f(bl.get('p95'))} | {_f(b.get('memory', {}).get('peak_rss_mib'), 1)} / "
            f"{_f(b.get('memory', {}).get('rss_mib'), 1)} | "
            f"{_f(torch_mib / 2**20 if torch_mib else None, 2)} | {_f(b.get('server_ready_s'), 1)} |")
    lines += ["", "Per phase:", "", "| backend | phase | answered once | answers | errors | batch sizes (images: batches) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, b in report["backends"].items():
        if b.get("failed"):
            lines.append(f"| {name} | - | - | - | FAILED: {b['failed']} | - |")
            continue
        for phase in ("served", "bare"):
            s = b.get(phase)
            if s:
                lines.append(f"| {name} | {phase} | {s['answered_exactly_once']} | {s['answers']} | "
                             f"{s['errors'] or '-'} | {s['batch_size_histogram']} |")
    return "\n".join(lines) + "\n"

"""Bounded load on the HTTP service over loopback: throughput, latency, batch sizes, exactly-once answers.

Starts `python -m pidrt.serve.app` (tiny preset, random weights) on 127.0.0.1 unless --url points at a
running server, enrolls a few IP-Adapter identities from a real face photo, sends --requests
generations with --concurrency in flight (identities mixed with identity-less requests), and
writes serve_load.json and serve_load.md to --out.

    python benchmarks/serve_load.py --out /tmp/load                          # 200 requests, 16 in flight
    python benchmarks/serve_load.py --requests 20 --concurrency 4 --out /tmp/load-small
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

PROMPTS = ["a portrait photo, studio light", "a person hiking in the mountains", "an oil painting of a face",
           "a photo at the beach", "a close-up, film grain"]


def face_variants(k: int) -> list[bytes]:
    """k distinct PNGs of a real face (mirror / brightness variants of one photo)."""
    from PIL import Image, ImageEnhance

    try:
        from skimage import data

        base = Image.fromarray(data.astronaut())
    except ImportError:
        from pidrt.runtime.demo import sample_face_photo

        base = Image.open(io.BytesIO(sample_face_photo()[0])).convert("RGB")
    out = []
    for i in range(k):
        img = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else base
        img = ImageEnhance.Brightness(img).enhance(1.0 + 0.05 * (i // 2))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, store: Path) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "pidrt.serve.app", "--preset", args.preset, "--host", "127.0.0.1",
           "--port", str(port), "--store", str(store), "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--queue-size", str(args.queue_size), "--steps", str(args.steps),
           "--detector", args.detector, "--log-level", "warning"]
    log = open(store.parent / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, limit_s: float) -> float:
    clock = time.monotonic()
    while time.monotonic() - clock < limit_s:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - clock
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not ready within {limit_s:.0f} s")


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


async def run_load(url: str, args, identities: list[str]) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(args.concurrency)
    # Identities in rotation with identity-less requests: None, id0, id1, ..., None, id0, ...
    rotation = [None] + identities
    results: list[dict] = [None] * args.requests  # type: ignore[list-item]

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": f"{args.size}x{args.size}",
                "steps": args.steps, "n": args.n}
        ident = rotation[i % len(rotation)]
        if ident:
            body["identity"] = ident
        async with sem:
            clock = time.monotonic()
            rec = {"index": i, "identity": ident, "answers": 0}
            try:
                r = await client.post(f"{url}/v1/images/generations", json=body, timeout=args.request_timeout_s)
                rec["answers"] += 1
                rec["status"] = r.status_code
                data = r.json()
                if r.status_code == 200:
                    rec["batch"] = data["batch"]
                    rec["replica"] = data.get("replica")
                    rec["timings"] = data["timings"]
                    rec["seeds_ok"] = [d["seed"] for d in data["data"]] == list(range(i, i + args.n))
                else:
                    rec["error"] = data.get("error", {}).get("type")
                    rec["retry_after"] = r.headers.get("retry-after")
            except (httpx.HTTPError, ValueError) as exc:
                rec["status"], rec["error"] = None, f"{type(exc).__name__}: {exc}"
            rec["latency_s"] = time.monotonic() - clock
            if results[i] is not None:
                rec["answers"] += results[i]["answers"]
            results[i] = rec

    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        clock = time.monotonic()
        tasks = [asyncio.ensure_future(one(client, i)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit_s)
        for t in pending:
            t.cancel()
        elapsed = time.monotonic() - clock
    for i, rec in enumerate(results):
        if rec is None:
            results[i] = {"index": i, "answers": 0, "status": None, "error": "no answer within the time limit"}
    return results, elapsed


def summarize(args, results: list[dict], elapsed: float, server: dict) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    lat = [r["latency_s"] for r in ok]
    batches = {}
    for r in ok:
        batches[(r.get("replica"), r["batch"]["id"])] = r["batch"]["images"]
    client_hist = dict(sorted(Counter(batches.values()).items()))
    stage = {}
    for name in ("queue_s", "unet_loop_s", "vae_decode_s", "encode_s", "total_s"):
        vals = [r["timings"][name] for r in ok if name in r["timings"]]
        stage[name] = {"p50": percentile(vals, 0.5), "p95": percentile(vals, 0.95)}
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "requests": args.requests,
        "answered_exactly_once": all(r["answers"] == 1 for r in results),
        "answers": dict(Counter(str(r.get("status")) for r in results)),
        "errors": dict(Counter(r["error"] for r in results if r.get("error"))),
        "seeds_reported_correctly": all(r.get("seeds_ok", False) for r in ok),
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(ok) / elapsed, 3) if elapsed else None,
        "images_per_s": round(len(ok) * args.n / elapsed, 3) if elapsed else None,
        "latency_s": {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95), "p99": percentile(lat, 0.99),
                      "max": max(lat) if lat else None, "mean": statistics.fmean(lat) if lat else None},
        "stage_s": stage,
        "batch_size_histogram": {"from_responses": client_hist, **server},
    }


def markdown(s: dict) -> str:
    c = s["config"]
    lat = s["latency_s"]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "# pidrt serve load check",
        "",
        f"{s['requests']} requests, {c['concurrency']} in flight, {c['identities']} identities + none in rotation, "
        f"{c['size']}x{c['size']}, {c['steps']} steps, n={c['n']}, max_batch={c['max_batch']}, "
        f"max_wait_ms={c['max_wait_ms']}, preset {c['preset']} ({s['host']['cpus']} CPUs).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| answered exactly once | {s['answered_exactly_once']} |",
        f"| answers by status | {s['answers']} |",
        f"| errors | {s['errors'] or '-'} |",
        f"| throughput | {s['throughput_rps']} req/s, {s['images_per_s']} images/s |",
        f"| latency p50 / p95 / p99 / max | {f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])} / {f(lat['max'])} s |",
        f"| elapsed | {s['elapsed_s']} s |",
        "",
        "| stage | p50 s | p95 s |",
        "| --- | --- | --- |",
        *[f"| {k} | {f(v['p50'])} | {f(v['p95'])} |" for k, v in s["stage_s"].items()],
        "",
        "| batch size (images) | batches (from responses) | batches (server metric) |",
        "| --- | --- | --- |",
    ]
    hist = s["batch_size_histogram"]
    server = hist.get("server_metric", {})
    sizes = sorted({int(k) for k in hist["from_responses"]} | {int(float(k)) for k in server if k != "+Inf"})
    for size in sizes:
        lines.append(f"| {size} | {hist['from_responses'].get(size, 0)} | {int(server.get(str(size), 0))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for serve_load.json and serve_load.md")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--identities", type=int, default=2, help="IP identities to enroll and mix in")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--detector", default="haar")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--time-limit-s", type=float, default=900.0, help="the whole load phase")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pidrt-load-"))
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, work / "store")
    try:
        ready_s = wait_ready(url, proc, args.ready_timeout_s)
        identities = []
        for photo in face_variants(args.identities):
            r = httpx.post(f"{url}/v1/identities", files=[("images", ("face.png", photo, "image/png"))],
                           data={"method": "ip"}, timeout=300)
            r.raise_for_status()
            identities.append(r.json()["id"])
        before = httpx.get(f"{url}/metrics", timeout=30).text
        results, elapsed = asyncio.run(run_load(url, args, identities))
        after = httpx.get(f"{url}/metrics", timeout=30).text
        b, a = metric_histogram(before, "pidrt_batch_images"), metric_histogram(after, "pidrt_batch_images")
        server_hist = {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
        summary = summarize(args, results, elapsed, {"server_metric": server_hist})
        summary["server_ready_s"] = round(ready_s, 2)
        summary["identities"] = identities
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    (args.out / "serve_load.json").write_text(json.dumps({**summary, "results": results}, indent=2, default=str))
    (args.out / "serve_load.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if summary["answered_exactly_once"] and summary["answers"].get("200") == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())

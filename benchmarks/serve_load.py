"""Bounded load on the HTTP service against the bare Generator on the same backend, in one run.

For each `--backend`: starts `python -m pidrt.serve.app --backend B` (tiny preset, random weights)
on 127.0.0.1 and waits for /readyz (every bucket warm), enrolls a few IP-Adapter identities from a
real face photo, sends `--requests` generations with `--concurrency` in flight (identities mixed
with identity-less requests), reads the server process's memory, stops it; then builds the same
Generator (`pidrt.serve.factory.build_generator`, same backend and config, same store) in this
process and runs the same requests at the same concurrency. The ratio served / bare is what the
HTTP layer (and its process boundary) costs. Writes serve_load.json and serve_load.md to --out.

    python benchmarks/serve_load.py --backend torch ort --out /tmp/load --requests 60 --concurrency 8
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --out /tmp/load   # a running server, served only
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_report import markdown, metric_histogram, process_memory, summarize  # noqa: E402

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


def buckets(args) -> str:
    batches = sorted({b for b in (1, 2, 4, 8, 16) if b <= args.max_batch} | {args.max_batch})
    return f"{','.join(map(str, batches))}@{args.size}x{args.size}"


def backend_args(args, backend: str) -> list[str]:
    """The server's (and the bare Generator's) model and backend options."""
    out = ["--preset", args.preset, "--device", args.device, "--backend", backend]
    if args.dtype:
        out += ["--dtype", args.dtype]
    if args.methods:
        out += ["--methods", *args.methods]
    if backend != "torch":
        out += ["--buckets", buckets(args)]
    for flag, value in (("--engines", args.engines), ("--engine-cache", args.engine_cache), ("--threads", args.threads)):
        if value is not None and (flag == "--threads" or backend in ("ort", "trt")):
            out += [flag, str(value)]
    return out


def start_server(args, backend: str, store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = args.port or s.getsockname()[1]
    cmd = [sys.executable, "-m", "pidrt.serve.app", "--host", "127.0.0.1", "--port", str(port), "--store", str(store), "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--queue-size", str(args.queue_size), "--steps", str(args.steps),
           "--detector", args.detector, "--log-level", "warning", *backend_args(args, backend)]
    log = open(store.parent / f"server-{backend}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, limit_s: float) -> float:
    clock = time.monotonic()
    while time.monotonic() - clock < limit_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - clock
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready within {limit_s:.0f} s")


def request_body(args, i: int, rotation: list) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": f"{args.size}x{args.size}",
            "steps": args.steps, "n": args.n}
    if rotation[i % len(rotation)]:
        body["identity"] = rotation[i % len(rotation)]
    return body


async def drive(args, one) -> tuple[list[dict], float]:
    """Run `one(i, record)` for every request, `--concurrency` at a time, within the time limit."""
    sem = asyncio.Semaphore(args.concurrency)
    results: list[dict] = [{"index": i, "answers": 0} for i in range(args.requests)]

    async def guarded(i: int) -> None:
        async with sem:
            clock = time.monotonic()
            await one(i, results[i])
            results[i]["latency_s"] = time.monotonic() - clock

    clock = time.monotonic()
    tasks = [asyncio.ensure_future(guarded(i)) for i in range(args.requests)]
    _, pending = await asyncio.wait(tasks, timeout=args.time_limit_s)
    for t in pending:
        t.cancel()
    elapsed = time.monotonic() - clock
    for rec in results:
        if not rec["answers"]:
            rec.setdefault("status", None)
            rec.setdefault("error", "no answer within the time limit")
    return results, elapsed


def record_ok(args, rec: dict, i: int, data: dict) -> None:
    rec.update(status=200, batch=data["batch"], replica=data.get("replica"), timings=data["timings"],
               seeds_ok=[d["seed"] for d in data["data"]] == list(range(i, i + args.n)))


async def served_load(url: str, args, rotation: list) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one(i: int, rec: dict) -> None:
            try:
                r = await client.post(f"{url}/v1/images/generations", json=request_body(args, i, rotation),
                                      timeout=args.request_timeout_s)
                rec["answers"] += 1
                if r.status_code == 200:
                    record_ok(args, rec, i, r.json())
                else:
                    rec.update(status=r.status_code, error=r.json().get("error", {}).get("type"))
            except (httpx.HTTPError, ValueError) as exc:
                rec.update(status=None, error=f"{type(exc).__name__}: {exc}")

        return await drive(args, one)


async def bare_load(generator, args, rotation: list) -> tuple[list[dict], float]:
    from pidrt.runtime.requests import GenerationRequest
    from pidrt.serve.protocol import GenerationBody, result_body

    async def one(i: int, rec: dict) -> None:
        request: GenerationRequest = GenerationBody(**request_body(args, i, rotation)).to_request()
        try:
            result = await generator.agenerate(request)
            rec["answers"] += 1
            record_ok(args, rec, i, result_body(result))  # the same encoding work the server does
        except Exception as exc:  # noqa: BLE001 - counted, like an HTTP error
            rec["answers"] += 1
            rec.update(status=getattr(exc, "status", 500), error=type(exc).__name__)

    return await drive(args, one)


def run_backend(args, backend: str, work: Path, out: dict, save) -> None:
    """Fills `out` phase by phase, calling `save()` after each (a run cut by a time limit keeps them)."""
    store = work / f"store-{backend}"
    proc, url = start_server(args, backend, store)
    try:
        out["server_ready_s"] = round(wait_ready(url, proc, args.ready_timeout_s), 2)
        identities = []
        for photo in face_variants(args.identities) if args.identities else ():
            r = httpx.post(f"{url}/v1/identities", files=[("images", ("face.png", photo, "image/png"))],
                           data={"method": "ip"}, timeout=300)
            r.raise_for_status()
            identities.append(r.json()["id"])
        rotation = [None] + identities
        before = httpx.get(f"{url}/metrics", timeout=30).text
        results, elapsed = asyncio.run(served_load(url, args, rotation))
        after = httpx.get(f"{url}/metrics", timeout=30).text
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        out["memory"] = process_memory(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    b, a = metric_histogram(before, "pidrt_batch_images"), metric_histogram(after, "pidrt_batch_images")
    out["served"] = summarize(results, elapsed, args.n)
    out["served"]["server_metric_batches"] = {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
    out["torch_bytes"] = stats.get("backend_report", {}).get("torch_bytes")
    out["backend_report"] = stats.get("backend_report")
    out["identities"] = identities
    out["results"] = {"served": results}
    save()
    if not args.no_bare:
        out["bare"] = run_bare(args, backend, store, rotation)
        save()


def run_bare(args, backend: str, store: Path, rotation: list) -> dict:
    from pidrt.serve.app import add_serve_arguments, config_from_args
    from pidrt.serve.factory import build_generator

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    config = config_from_args(p.parse_args(
        ["--store", str(store), "--max-batch", str(args.max_batch),
         "--max-wait-ms", str(args.max_wait_ms), "--queue-size", str(args.queue_size), "--steps", str(args.steps),
         "--detector", args.detector, *backend_args(args, backend)]))
    generator = build_generator(config.store, config.runtime, config.generator, config.backend, progress=False)
    try:
        results, elapsed = asyncio.run(bare_load(generator, args, rotation))
    finally:
        generator.close()
    return summarize(results, elapsed, args.n)


def host_info(args) -> dict:
    import platform

    import torch

    from pidrt.bench.env import cpu_name, git_commit, load_average

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    git = git_commit()
    return {"device": name, "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "git_commit": git["commit"] or os.environ.get("PIDRT_GIT_COMMIT"),
            "git_dirty": git["dirty"], "load_average_start": load_average()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for serve_load.json and serve_load.md")
    p.add_argument("--backend", nargs="+", default=["torch"], choices=["auto", "torch", "fast", "ort", "trt"])
    p.add_argument("--engines", type=Path, help="ort/trt: an export folder (default: the engine cache)")
    p.add_argument("--engine-cache", type=Path)
    p.add_argument("--threads", type=int, help="onnxruntime threads of the server (and the bare Generator)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare Generator phase")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--identities", type=int, default=2,
                   help="IP identities to enroll and mix in (0: identity-less requests only, no face detector needed)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="the server's (default: its own)")
    p.add_argument("--methods", nargs="+", choices=["none", "sca", "ip", "eaa"],
                   help="UNet graphs / warm-up methods of the server (default: its own; the load uses none and ip)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--detector", default="haar")
    p.add_argument("--url", default=None, help="load a running server instead (served phase only)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--time-limit-s", type=float, default=900.0, help="each load phase")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")

    from pidrt.bench.env import load_average

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pidrt-load-"))
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
              "host": host_info(args), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "backends": {}}

    def save() -> None:
        report["host"]["load_average_end"] = load_average()
        (args.out / "serve_load.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "serve_load.md").write_text(markdown(report))

    if args.url:
        results, elapsed = asyncio.run(served_load(args.url, args, [None]))
        report["backends"]["url"] = {"served": summarize(results, elapsed, args.n)}
    for backend in [] if args.url else args.backend:
        report["backends"][backend] = {}
        try:
            run_backend(args, backend, work, report["backends"][backend], save)
        except Exception as exc:  # noqa: BLE001 - the other backends still run; the report says why
            print(f"{backend} failed: {type(exc).__name__}: {exc} (logs in {work})", file=sys.stderr)
            report["backends"][backend]["failed"] = f"{type(exc).__name__}: {exc}"
    save()
    ok = all(b.get("served") and b["served"]["answered_exactly_once"] and not b.get("failed")
             and b["served"]["answers"].get("200") == args.requests for b in report["backends"].values())
    print(markdown(report))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

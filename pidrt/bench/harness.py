"""`run_bench`: one benchmark run, from a `BenchConfig` to a result dict (and its files).

Order within a run: identities are enrolled (the cases' inputs), enrollment costs, flop counts
on the torch reference, then the generation cases. A case is one (backend, method variant,
batch size): `warmup` untimed generations and `iterations` timed ones; its peak memory is the
largest over the timed ones. The cases of one (variant, batch) on diffusers, torch, ort and trt
form a group that is timed round-robin (`_run_group`), so what is compared is measured side by
side; fast runs last on its own (it converts the shared models in place). A case that
cannot run is kept with its reason.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

import torch

from pidrt.bench import env
from pidrt.bench.backends import open_backend
from pidrt.bench.baseline import SUPPORTED as BASELINE_METHODS
from pidrt.bench.baseline import DiffusersBaseline, baseline_reason
from pidrt.bench.config import H100_SXM_DENSE_FP16, BenchConfig, split_variant
from pidrt.bench.identities import batch_specs, enroll_identities, identities_needed
from pidrt.bench.timing import MemoryProbe, StageClock, summarize, timed, torch_threads
from pidrt.errors import PidrtError
from pidrt.runtime.pipeline import SamplingConfig

SCHEMA = "pidrt-bench/1"
RUN_ORDER = ("torch", "ort", "trt", "fast")
STAGES = ("text_encode_s", "unet_loop_s", "vae_decode_s", "total_s")
BATCH_PATTERN = ("element k carries identity (k // 2) mod 2 when k is even and no identity when k is odd "
                 "(B=1: [id0]; B=2: [id0, none]; B=4: [id0, none, id1, none]); method none: no identities")
RATIO_DEFINITIONS = {
    "vs_diffusers": "diffusers' median total time for the same method and batch / this case's (speedup; "
                    "null where diffusers has no implementation of the method)",
    "vs_diffusers_none": "diffusers' plain-UNet (none) median total time at this batch / this case's",
    "vs_pidrt_none": "the same backend's method-none median total time at this batch / this case's "
                     "(below 1: what the identity method costs)",
    "vs_torch_none": "pidrt's torch reference, method none, median total time at this batch / this case's",
    "unet_loop_vs_diffusers": "as vs_diffusers, for the UNet loop stage alone",
}


def default_stem(device: torch.device, preset: str, when) -> str:
    return f"{device.type}-{preset}-{when.strftime('%Y-%m-%d')}"


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="pidrt bench", unit="case", disable=not enabled, dynamic_ncols=True)


def _error(exc: BaseException) -> dict:
    if isinstance(exc, PidrtError):
        return {"status": "skipped", "reason": str(exc)}
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}{where}"}


class _Participant:
    """One (backend, variant, batch) case of an interleaved group: `setup`, then `run` per generation."""

    def __init__(self, name: str, case: dict, setup, run):
        self.name, self.case, self.setup, self.run = name, case, setup, run
        self.rows: list[dict] = []
        self.memory: list[dict] = []
        self.images = None


def _pidrt_participant(name: str, case: dict, backend, sampling: SamplingConfig, specs) -> _Participant:
    box: dict = {}

    def setup():
        box["pipe"] = backend.pipeline(case["method"])
        box["sampling"] = SamplingConfig(**{**vars(sampling), "eaa_placement": case["placement"] or "resident"})

    def run():
        pipe, smp = box["pipe"], box["sampling"]
        with StageClock(pipe, smp.steps) as clock:
            out, total = timed(lambda: pipe.generate(smp, specs, on_step=clock.on_step), pipe.device)
        return {**out.timings, "total_s": total}, out.images

    return _Participant(name, case, setup, run)


def _baseline_participant(case: dict, baseline, sampling: SamplingConfig, specs, scale: float) -> _Participant:
    def run():
        images, timings = baseline.generate(case["method"], sampling, specs, scale)
        return timings, images

    return _Participant("diffusers", case, lambda: None, run)


def _run_group(group: list[_Participant], warmup: int, iterations: int, device: torch.device) -> None:
    """Warm every participant up, then time them round-robin, one generation each per round.

    Interleaving puts the cases that are compared with each other (same method and batch on every
    backend and on diffusers) side by side in time, so drift in the machine's load (shared CPUs,
    clocks) falls on all of them alike; the participant that starts a round rotates.
    """
    memory = MemoryProbe(device)
    live = []
    for p in group:
        try:
            p.setup()
            for _ in range(warmup):
                p.run()
            live.append(p)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            p.case |= _error(exc)
            _free(device)
    for i in range(iterations):
        k = i % len(live) if live else 0
        for p in live[k:] + live[:k]:
            if "status" in p.case:
                continue
            try:
                memory.reset()
                timings, images = p.run()
                p.memory.append(memory.read())
                p.rows.append(timings)
                p.images = images
            except Exception as exc:  # noqa: BLE001
                p.case |= _error(exc)
                _free(device)
    for p in live:
        if "status" in p.case:
            continue
        p.case |= {"status": "ok",
                   "stages_s": {k: summarize([r[k] for r in p.rows]) for k in STAGES if k in p.rows[0]},
                   "memory": max(p.memory, key=lambda m: m["peak_bytes"])}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(config: BenchConfig, write: bool = True, log=print) -> dict:
    """Run the benchmark; with `write`, save <out>/<stem>.json, .md and plots. Returns the result dict."""
    from pidrt.runtime.setup import build_runtime

    started, clock0 = env.now_utc(), time.perf_counter()
    with torch_threads(config.threads), tempfile.TemporaryDirectory(prefix="pidrt-bench-") as scratch:
        pipe, encoders = build_runtime(config.runtime)
        device = pipe.device
        preset = pipe.models.preset
        height, width = config.height or preset.resolution, config.width or preset.resolution
        sampling = SamplingConfig(steps=config.steps, guidance=config.guidance, height=height, width=width)
        sampling.check(preset.latent_scale)
        variants = config.variants()
        methods = list(dict.fromkeys(split_variant(v)[0] for v in variants))
        result: dict = {
            "schema": SCHEMA,
            "date": started.isoformat(timespec="seconds"),
            "git": env.git_commit(),
            "device": env.device_info(device),
            "versions": env.versions(),
            "config": config.as_json(),
            "models": {"preset": preset.name, "weights": pipe.models.name, "dtype": str(pipe.dtype).removeprefix("torch."),
                       "device": str(device)},
            "sampling": {"steps": sampling.steps, "guidance": sampling.guidance, "height": height, "width": width,
                         "scheduler": sampling.scheduler, "folded": sampling.folded},
            "ratio_definitions": RATIO_DEFINITIONS,
            "notes": [],
            "cases": [],
        }

        ids = enroll_identities(pipe, encoders, methods, config.steps, height, width, config.runtime.seed,
                                Path(scratch) / "identities", identities_needed(config.batch_sizes))
        result["identities"] = {"photos": ids.photos, "ids": ids.ids, "unavailable": ids.unavailable,
                                "batch_pattern": BATCH_PATTERN, "scale": config.scale}

        enroll_cfg = config.enroll
        enroll_methods = [m for m in enroll_cfg.methods] if enroll_cfg.enabled else []
        resolutions = enroll_cfg.resolutions or (height,)
        steps_list = enroll_cfg.steps or (config.steps,)
        n_enroll = sum(len(resolutions) * len(steps_list) if m == "eaa" else 1 for m in enroll_methods)
        baseline_variants = [v for v in variants if split_variant(v)[0] in BASELINE_METHODS] if config.baseline else []
        backends = [b for b in RUN_ORDER if b in config.backends]
        total = n_enroll + (len(baseline_variants) + len(backends) * len(variants)) * len(config.batch_sizes)
        images: dict = {}
        with _progress(total, config.progress) as bar:
            # Enrollment costs.
            if enroll_methods:
                from pidrt.bench.enrollment import bench_enrollment

                result["enrollment"] = bench_enrollment(
                    pipe, encoders, enroll_methods, resolutions, steps_list, enroll_cfg.iterations or config.iterations,
                    enroll_cfg.warmup, config.runtime.seed, progress=bar, store_dir=Path(scratch) / "enroll")

            # Flops (torch reference) per variant and batch.
            result["flops"] = _flops(config, pipe, sampling, variants, ids) if config.flops else {}

            # The diffusers baseline and the backends, interleaved per (variant, batch); fast last.
            result["baseline"] = {"implementation": "diffusers.StableDiffusionPipeline (eager) on pidrt's UNet, text "
                                  "encoder and VAE modules; DDIMScheduler from the same config; prompt_embeds bypass "
                                  "the tokenizer", "methods": {}}
            for method in methods:
                reason = baseline_reason(method, ids) if config.baseline else "baseline disabled (--no-baseline)"
                result["baseline"]["methods"][method] = reason or "run"
            baseline = DiffusersBaseline(pipe, ids) if baseline_variants else None
            result["backends"] = {}
            opened: dict = {}

            def open_(name: str):
                return open_backend(name, pipe, ids.encoders or encoders, config.batch_sizes, height, width, methods,
                                    engines=config.engines, engine_cache=config.engine_cache, threads=config.threads)

            for name in backends:
                if name != "fast":
                    bar.set_postfix_str(f"opening {name}")
                    opened[name] = open_(name)
            smallest = min(config.batch_sizes)

            def group_for(names, variant, batch) -> list[_Participant]:
                method, placement = split_variant(variant)
                specs = batch_specs(batch, ids.conditions.get(method), config.prompt, config.runtime.seed, config.scale)
                group = []
                for name in names:
                    case = {"backend": name, "variant": variant, "method": method, "placement": placement,
                            "batch": batch}
                    result["cases"].append(case)
                    if name == "diffusers":
                        reason = baseline_reason(method, ids)
                        if reason:
                            case |= {"status": "skipped", "reason": reason}
                        else:
                            group.append(_baseline_participant(case, baseline, sampling, specs, config.scale))
                        continue
                    backend = opened[name]
                    if not backend.available:
                        case |= {"status": "skipped", "reason": f"backend unavailable: {backend.reason}"}
                    elif method != "none" and method in ids.unavailable:
                        case |= {"status": "skipped", "reason": ids.unavailable[method]}
                    else:
                        group.append(_pidrt_participant(name, case, backend, sampling, specs))
                return group

            def run_groups(names) -> None:
                for variant in variants:
                    for batch in config.batch_sizes:
                        here = [n for n in names if n != "diffusers" or variant in baseline_variants]
                        bar.set_postfix_str(f"{variant} B={batch}: {', '.join(here)}")
                        group = group_for(here, variant, batch)
                        _run_group(group, config.warmup, config.iterations, device)
                        for p in group:
                            if batch == smallest and p.images is not None:  # compared with the torch reference
                                images[(p.name, variant, batch)] = p.images.detach().float().cpu()
                        bar.update(len(here))

            run_groups((["diffusers"] if baseline_variants else []) + [n for n in backends if n != "fast"])
            if baseline is not None and config.flops:
                result["flops"]["diffusers_unet_call"] = _baseline_flops(baseline, sampling, ids, config,
                                                                        baseline_variants)
            for name in [n for n in backends if n != "fast"]:
                backend = opened[name]
                result["backends"][name] = {"available": backend.available, "reason": backend.reason,
                                            "info": backend.report()}
                backend.close()
            if "fast" in backends:
                # It converts the shared models in place (no second copy in memory): nothing runs after it,
                # so it is not interleaved with the others.
                bar.set_postfix_str("opening fast")
                fast = opened["fast"] = open_("fast")
                run_groups(["fast"])
                result["backends"]["fast"] = {"available": fast.available, "reason": fast.reason,
                                              "info": fast.report()}
                fast.close()

        result["device"]["load_average_end"] = env.load_average()
        _derive(result, config, device, images)
        result["elapsed_s"] = time.perf_counter() - clock0

    if write:
        from pidrt.bench.report import write_outputs

        out_dir = Path(config.out_dir)
        stem = config.name or default_stem(device, preset.name, started)
        result["files"] = write_outputs(result, out_dir, stem, plots=config.plots, log=log)
    return result


def _flops(config: BenchConfig, pipe, sampling, variants, ids) -> dict:
    from pidrt.bench.flops import count_generation

    by_variant: dict = {}
    for variant in variants:
        method, placement = split_variant(variant)
        if method != "none" and method not in ids.conditions:
            continue
        run_sampling = SamplingConfig(**{**vars(sampling), "eaa_placement": placement or "resident"})
        by_variant[variant] = {}
        for batch in config.batch_sizes:
            specs = batch_specs(batch, ids.conditions.get(method), config.prompt, config.runtime.seed, config.scale)
            try:
                by_variant[variant][str(batch)] = count_generation(pipe, run_sampling, specs)
            except Exception as exc:  # noqa: BLE001
                by_variant[variant][str(batch)] = _error(exc)
    cuda = pipe.device.type == "cuda"
    peak = config.peak_flops or (H100_SXM_DENSE_FP16 if cuda else None)
    if config.peak_flops:
        note = f"peak {peak:.4g} flop/s as given (--peak-flops)"
    elif cuda:
        note = ("peak 989e12 flop/s is the nominal H100 SXM dense fp16/bf16 tensor-core figure (no sparsity), "
                "not a measurement and not this GPU's unless it is one; pass --peak-flops for others")
    else:
        note = "CPU: achieved GFLOP/s only (no peak given)"
    return {"by_variant": by_variant, "peak_flops": peak, "peak_note": note,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode on one call of each model (torch reference; "
                            "matmul, conv and attention flops; the CPU flash-attention op added)"}


def _baseline_flops(baseline, sampling, ids, config, variants) -> dict:
    out = {}
    one = SamplingConfig(**{**vars(sampling), "steps": 1})
    for method in variants:
        if baseline_reason(method, ids):
            continue
        specs = batch_specs(1, ids.conditions.get(method), config.prompt, config.runtime.seed, config.scale)
        try:
            _, t = baseline.generate(method, one, specs, config.scale, count_flops=True)
            out[method] = {"unet_call": t.get("_unet_call_flops"), "unet_batch": t.get("_unet_batch")}
        except Exception as exc:  # noqa: BLE001
            out[method] = _error(exc)
    return out


def _median(case: dict | None, stage: str = "total_s") -> float | None:
    if not case or case.get("status") != "ok":
        return None
    return case["stages_s"][stage]["median"]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _derive(result: dict, config: BenchConfig, device, images: dict) -> None:
    """Images/s, achieved flop rates, and the ratios of every case (RATIO_DEFINITIONS)."""
    cases = {(c["backend"], c["variant"], c["batch"]): c for c in result["cases"]}
    flops = result.get("flops", {})
    by_variant = flops.get("by_variant", {})
    peak = flops.get("peak_flops")
    for (backend, variant, batch), case in cases.items():
        if case.get("status") != "ok":
            continue
        total = _median(case)
        case["images_per_s"] = batch / total if total else None
        method = case["method"]
        diff_same = cases.get(("diffusers", method, batch)) if method in BASELINE_METHODS else None
        case["ratios"] = {
            "vs_diffusers": _ratio(_median(diff_same), total),
            "vs_diffusers_none": _ratio(_median(cases.get(("diffusers", "none", batch))), total),
            "vs_pidrt_none": _ratio(_median(cases.get((backend, "none", batch))), total)
            if backend != "diffusers" else None,
            "vs_torch_none": _ratio(_median(cases.get(("torch", "none", batch))), total),
            "unet_loop_vs_diffusers": _ratio(_median(diff_same, "unet_loop_s"), _median(case, "unet_loop_s")),
        }
        # diffusers' IP-Adapter branch is not pidrt's folded one: its flops were counted apart (B=1 only).
        count = by_variant.get(variant, {}).get(str(batch)) if backend != "diffusers" or method == "none" else None
        if isinstance(count, dict) and count.get("generation"):
            rate = count["generation"] / total
            case["flops"] = {"generation": count["generation"], "achieved_flop_s": rate,
                             "peak_fraction": rate / peak if peak else None}
    # The baseline computes the same images as pidrt's torch reference where the methods match.
    parity = {}
    for (backend, variant, batch), imgs in images.items():
        if backend != "diffusers" or batch != min(config.batch_sizes):
            continue
        ours = images.get(("torch", variant, batch))
        if ours is not None and ours.shape == imgs.shape:
            parity[f"{variant}@B={batch}"] = float((ours - imgs).abs().max())
    result["baseline"]["max_abs_diff_vs_torch"] = parity
    ref = {}
    for (backend, variant, batch), imgs in images.items():
        if backend in ("torch", "diffusers"):
            continue
        ours = images.get(("torch", variant, batch))
        if ours is not None and ours.shape == imgs.shape:
            ref[f"{backend}:{variant}@B={batch}"] = float((ours - imgs).abs().max())
    result["max_abs_diff_vs_torch"] = ref
    notes = result["notes"]
    dev = result["device"]
    loads = [x for x in (dev.get("load_average_start"), dev.get("load_average_end")) if x]
    cpus = dev.get("cpu_count") or 1
    if loads and max(x[0] for x in loads) > cpus / 2:
        notes.append(f"the machine was shared: 1-minute load average {loads[0][0]} at the start and {loads[-1][0]} at "
                     f"the end on {cpus} CPUs, so other processes competed for the cores; the cases compared with "
                     "each other were timed interleaved, but absolute times and small ratios are noisy.")
    if config.iterations < 20:
        notes.append(f"{config.iterations} timed runs per case: p95 is interpolated between the largest runs "
                     "(numpy's linear percentile), close to the max.")
    if device.type == "cpu":
        notes.append("CPU peak memory is the process's peak RSS over a case's timed runs (VmHWM reset through "
                     "/proc/self/clear_refs; 'process_max_rss_lifetime' where that is not possible): it includes "
                     "everything the process holds, e.g. the models of every backend opened so far.")
    else:
        notes.append("GPU peak memory is torch.cuda.max_memory_allocated over the timed runs; onnxruntime and "
                     "TensorRT allocate outside torch's allocator (see device_used_after_bytes).")
    if "ip" in result["baseline"]["methods"] and result["baseline"]["methods"]["ip"] == "run":
        notes.append("diffusers' IP-Adapter applies one scale to the whole batch: pidrt's no-identity elements "
                     "carry a zero image embedding in the baseline (same work, different images); images are "
                     "compared at B=1 only.")
    for method in ("sca", "eaa"):
        if method in result["baseline"]["methods"]:
            notes.append(f"{method}: {baseline_reason(method, None)}; compared with diffusers' plain UNet "
                         "(vs_diffusers_none) and pidrt's own none.")

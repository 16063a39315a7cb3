"""Whole generations: pidrt's fast backend vs diffusers' eager StableDiffusionPipeline (GPU).

    python benchmarks/bench_generation.py --out benchmarks/results/generation_h100
    python benchmarks/bench_generation.py --out /tmp/smoke --preset tiny --device cpu --steps 3 --repeats 1

One image (batch 1, classifier-free guidance: UNet batch 2), 50 DDIM steps, 512x512, fp16, random
weights (build_random(SD15)). Every pipeline runs the same modules: the same UNet weights, text
encoder, VAE, scheduler settings, starting noise and prompt embeddings.
- `diffusers`: StableDiffusionPipeline, eager, AttnProcessor2_0; for the personalised row its
  own IPAdapterAttnProcessor2_0 on the same IP-Adapter weights (to_k_ip / to_v_ip and the image
  projection) - the fair personalised baseline. SCA has no diffusers processor, so the SCA row
  is compared with diffusers' IP-Adapter row (same token count, same place in the UNet).
- `pidrt-reference`: pidrt's torch `Pipeline` (eager, folded branches in plain torch).
- `pidrt-fast`: `make_fast` (fp16, channels_last, measured SDPA backend, Triton kernels, CUDA graphs).
Reported per row: seconds per image (median of --repeats, after one untimed warm-up generation
whose time - graph capture and SDPA selection included - is reported as `first_s`), UNet-loop it/s
(steps 2..N between synchronised callbacks), peak GPU memory (absolute, and above what was
allocated before the call), and the % of the device's dense fp16 peak implied by the UNet's flop
count (torch.utils.flop_counter on one UNet call of that pipeline; peak --peak-flops, default
H100 SXM 989e12, a nominal number). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (median)")
    p.add_argument("--ip-scale", type=float, default=0.6)
    p.add_argument("--sca-scale", type=float, default=0.4)
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="the device's dense fp16 peak flop/s (nominal; default H100 SXM 989e12)")
    p.add_argument("--prompt", default="a portrait photo of a person, studio light")
    p.add_argument("--no-reference", action="store_true", help="skip the pidrt-reference rows")
    return p.parse_args(argv)


class StepClock:
    """it/s of a denoising loop from callbacks: synchronised at the end of the first and last step,
    so the figure excludes text encoding, VAE decoding and the first step's one-off work."""

    def __init__(self, device, steps: int):
        self.device, self.steps, self.start, self.end = device, steps, None, None

    def __call__(self, i: int) -> None:
        if i == 0 or i == self.steps - 1:
            common.sync(self.device)
            now = time.perf_counter()
            if i == 0:
                self.start = now
            if i == self.steps - 1:
                self.end = now

    @property
    def its(self) -> float | None:
        if self.start is None or self.end is None or self.steps < 2 or self.end <= self.start:
            return None
        return (self.steps - 1) / (self.end - self.start)


def main(argv=None) -> int:
    args = parse_args(argv)
    why = common.refusal(args)
    if why:
        print(f"bench_generation.py: {why}", file=sys.stderr)
        return 2
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from pidrt.engines.fast_torch import make_fast
    from pidrt.models.attention import attention_layers
    from pidrt.models.build import build_random
    from pidrt.models.presets import get_preset
    from pidrt.models.conditions import ScaleSchedule
    from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig, initial_noise

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), common.dtype_of(args)
    preset = get_preset(args.preset)
    size = preset.resolution
    models = build_random(preset, seed=args.seed)
    layers = attention_layers(models.unet)
    conds, ip_weights, ip_embed = common.few_token_conditions(models, layers, args.seed)
    diffusers_unet = copy.deepcopy(models.unet)  # before pidrt installs its processors
    reference = Pipeline(models, device, dtype)
    fast = make_fast(reference, common.fast_config(args))

    sc = preset.scheduler
    scheduler = DDIMScheduler(num_train_timesteps=sc.num_train_timesteps, beta_start=sc.beta_start,
                              beta_end=sc.beta_end, beta_schedule=sc.beta_schedule, clip_sample=False,
                              set_alpha_to_one=sc.set_alpha_to_one, steps_offset=sc.steps_offset,
                              prediction_type=sc.prediction_type, timestep_spacing=sc.timestep_spacing)
    # The tokenizer is never used: prompt embeddings come from the shared text encoder.
    dpipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=None,
                                    unet=diffusers_unet.to(device, dtype), scheduler=scheduler, safety_checker=None,
                                    feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    dpipe.set_progress_bar_config(disable=True)

    sampling = SamplingConfig(steps=args.steps, guidance=args.guidance, height=size, width=size, scheduler="ddim")
    seed = args.seed + 1234
    with torch.no_grad():
        embeds = reference.encode_text([args.prompt, ""])
    noise = initial_noise([seed], (4, size // preset.latent_scale, size // preset.latent_scale), dtype, device)

    def pidrt_run(pipe, cond, scale):
        spec = [ImageSpec(args.prompt, seed, condition=cond, schedule=ScaleSchedule(scale))]

        def run(clock):
            return pipe.generate(sampling, spec, on_step=lambda i, n: clock(i)).images

        return run

    def diffusers_run(ip: bool):
        kwargs = {}
        if ip:
            kwargs["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(ip_embed), ip_embed])[:, None].to(device, dtype)]

        def run(clock):
            return dpipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], latents=noise.clone(),
                         num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                         output_type="pt", callback_on_step_end=lambda p, i, t, kw: (clock(i), kw)[1],
                         **kwargs).images

        return run

    def install_ip(unet):
        procs, by_name = {}, {layer.name: layer for layer in layers}
        for key in unet.attn_processors:
            layer = by_name[key.removesuffix(".processor")]
            if layer.kind != "cross":
                procs[key] = AttnProcessor2_0()
                continue
            w = ip_weights.layers[layer.index]
            proc = IPAdapterAttnProcessor2_0(layer.channels, preset.unet.cross_attention_dim,
                                             num_tokens=(ip_weights.n_tokens,), scale=args.ip_scale)
            with torch.no_grad():
                proc.to_k_ip[0].weight.copy_(w["to_k_ip.weight"])
                proc.to_v_ip[0].weight.copy_(w["to_v_ip.weight"])
            procs[key] = proc.to(device, dtype)
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([copy.deepcopy(ip_weights.image_proj)]).to(device, dtype)
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    rows, images, failed = [], {}, {}

    def measure(backend: str, method: str, run, unet_call, baseline: str | None):
        """One row; a failure (e.g. a kernel that does not compile on this GPU) is reported and the
        run goes on, so one lease brings back every row that works."""
        print(f"{backend} {method} ...", file=sys.stderr)
        try:
            _measure(backend, method, run, unet_call, baseline)
        except Exception as exc:  # noqa: BLE001 - any failure of one row
            failed[f"{backend}/{method}"] = common.failure(f"{backend} {method}", exc)
            images.pop((backend, method), None)
        write(False)

    def _measure(backend: str, method: str, run, unet_call, baseline: str | None):
        with torch.no_grad():
            first_clock = StepClock(device, args.steps)
            common.sync(device)
            start = time.perf_counter()
            images[(backend, method)] = run(first_clock).float().cpu()
            common.sync(device)
            first = time.perf_counter() - start
            seconds, its, peaks, extra = [], [], [], []
            for _ in range(args.repeats):
                clock = StepClock(device, args.steps)
                before = common.reset_peak(device)
                start = time.perf_counter()
                run(clock)
                common.sync(device)
                seconds.append(time.perf_counter() - start)
                its.append(clock.its)
                peak = common.peak_bytes(device)
                peaks.append(peak)
                extra.append(peak - before)
            flops = _unet_flops(unet_call)
        its_med = statistics.median([v for v in its if v is not None]) if any(its) else None
        rows.append({
            "backend": backend, "method": method, "baseline": baseline,
            "s_per_image": statistics.median(seconds), "seconds": seconds, "first_s": first,
            "unet_it_per_s": its_med, "peak_gib": max(peaks) / 2**30, "peak_above_start_gib": max(extra) / 2**30,
            "unet_flops_per_step": flops,
            "pct_of_peak": (100 * flops * its_med / args.peak_flops) if (flops and its_med) else None,
        })

    run = common.run_meta(device, preset=preset.name, size=size, steps=args.steps, guidance=args.guidance,
                          dtype=str(dtype), batch=1, peak_flops=args.peak_flops, peak_is_nominal=True,
                          ip_scale=args.ip_scale, sca_scale=args.sca_scale, repeats=args.repeats)

    def write(final: bool) -> None:
        """The report of the rows so far: written after every row, so a run cut short keeps them."""
        by_key = {(r["backend"], r["method"]): r for r in rows}
        for r in rows:
            base = by_key.get(tuple(r["baseline"].split("/"))) if r["baseline"] else None
            if base:
                r["speedup_vs_baseline"] = base["s_per_image"] / r["s_per_image"]
                r["it_speedup_vs_baseline"] = (r["unet_it_per_s"] / base["unet_it_per_s"]
                                              if r["unet_it_per_s"] and base["unet_it_per_s"] else None)
        agreement = {
            f"{b}/{m} vs diffusers/{m}": float((images[(b, m)] - images[("diffusers", m)]).abs().max())
            for b, m in images if b != "diffusers" and ("diffusers", m) in images
        }
        meta = {**run, "complete": final, "failed": failed}
        table = [[r["backend"], r["method"], r["s_per_image"], r["unet_it_per_s"], r["first_s"], r["peak_gib"],
                  r["peak_above_start_gib"], (r["unet_flops_per_step"] or 0) / 1e12, r["pct_of_peak"],
                  f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}" if r.get("speedup_vs_baseline") else ""]
                 for r in rows]
        md = "\n".join([
            f"# Generation: {meta['device']}, {preset.name} {size}x{size}, {args.steps} DDIM steps, batch 1 (CFG), "
            f"{str(dtype).removeprefix('torch.')}{'' if final else ' (INCOMPLETE: the run stopped early)'}",
            "",
            f"torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, commit {meta['git_commit']}"
            f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['date']}. Random weights, same modules in every row. "
            f"s/image: median of {args.repeats} after a warm-up (first_s: the warm-up, graph capture included). "
            f"% of peak: UNet flops x it/s / {args.peak_flops:.3g} flop/s (nominal dense fp16 peak). "
            "SCA has no diffusers processor: its baseline is diffusers' IP-Adapter row. "
            f"Fast backend: {fast.report()['config']}.",
            "",
            common.md_table(["backend", "method", "s/image", "UNet it/s", "first s", "peak GiB", "peak above start GiB",
                             "TFLOP/step", "% of peak", "speedup"], table),
            "",
            "Max abs image difference against diffusers (same noise, weights, scheduler): "
            + ", ".join(f"{k}: {v:.3g}" for k, v in agreement.items()),
            "",
            *(f"FAILED {k}: {why}" for k, why in failed.items()),
        ])
        common.write_outputs(args.out, {"meta": meta, "rows": rows, "image_max_abs_diff": agreement,
                                        "fast_backend": fast.report()}, md, echo=final)

    # diffusers first, base then IP-Adapter (the processors change in place)
    measure("diffusers", "base", diffusers_run(False), lambda: _diffusers_step(dpipe, False), None)
    install_ip(dpipe.unet)
    measure("diffusers", "ip", diffusers_run(True), lambda: _diffusers_step(dpipe, True), None)
    cases = {"base": (None, 0.0), "ip": (conds["ip"], args.ip_scale), "sca": (conds["sca"], args.sca_scale)}
    pidrt = [("pidrt-fast", fast)] + ([] if args.no_reference else [("pidrt-reference", reference)])
    for backend, pipe in pidrt:
        for method, (cond, scale) in cases.items():
            baseline = "diffusers/ip" if method in ("ip", "sca") else "diffusers/base"
            measure(backend, method, pidrt_run(pipe, cond, scale),
                    lambda pipe=pipe, cond=cond, scale=scale: _pidrt_step(pipe, sampling, args.prompt, seed, cond, scale),
                    baseline)
    print(f"device: {run['device']} (peak for %: {args.peak_flops:.3g} flop/s, nominal)",
          file=sys.stderr)
    write(True)
    return 0


def _unet_flops(call) -> int | None:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - a count that fails must not lose the timings
        print(f"flop count failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _pidrt_step(pipe, sampling, prompt, seed, cond, scale) -> int:
    """Flops of one UNet call of a 1-step generation (the same payloads), on the eager torch path:
    the fast backend's Triton kernels and graphs are invisible to the counter, so its count is
    taken with them off (the same maths)."""
    import dataclasses

    from pidrt.models.conditions import ScaleSchedule
    from pidrt.runtime.pipeline import ImageSpec, Pipeline

    counted = []
    state, fused = pipe.state, pipe.state.fused

    def counting(x, t, ctx):
        out = []
        state.fused = None
        try:
            counted.append(common.count_flops(lambda: out.append(Pipeline.unet(pipe, x, t, ctx))))
        finally:
            state.fused = fused
        return out[0]

    pipe.unet = counting  # instance attribute: shadows the method for this one generation
    try:
        pipe.generate(dataclasses.replace(sampling, steps=1), [ImageSpec(prompt, seed, condition=cond,
                                                                         schedule=ScaleSchedule(scale))])
    finally:
        del pipe.unet
    return counted[0]


def _diffusers_step(dpipe, ip: bool) -> int:
    """Flops of one UNet call of diffusers' pipeline (1-step generation, the forward wrapped)."""
    unet, counted = dpipe.unet, []
    forward = unet.forward

    def counting(*a, **kw):
        out = []
        counted.append(common.count_flops(lambda: out.append(forward(*a, **kw))))
        return out[0]

    unet.forward = counting
    try:
        import torch

        size = dpipe.unet.config.sample_size * dpipe.vae_scale_factor
        emb = dpipe.text_encoder.config.hidden_size
        embeds = torch.zeros(1, 77, emb, device=dpipe.device, dtype=dpipe.unet.dtype)
        kwargs = {}
        if ip:
            proj = unet.encoder_hid_proj.image_projection_layers[0]
            kwargs["ip_adapter_image_embeds"] = [torch.zeros(2, 1, proj.proj.in_features, device=dpipe.device,
                                                             dtype=dpipe.unet.dtype)]
        dpipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=1, height=size, width=size,
              output_type="latent", **kwargs)
    finally:
        del unet.forward
    return counted[0]


if __name__ == "__main__":
    sys.exit(main())

"""Layout-and-Retouch: what the cheaper paths cost and how far they move the images.

    python benchmarks/bench_retouch.py --out benchmarks/results/retouch-h200 --steps 50
    python benchmarks/bench_retouch.py --out /tmp/r --preset tiny --device cpu --steps 10

Four ways of serving stage 2's two guide paths (pidrt.runtime.retouch), side by side in one run
on the same models, prompts, seeds and reference:
- `inversion+rows`: the paper's form. The layout image is DDIM-inverted and denoised again as a
  row of every stage-2 call; the reference path is P_T denoised as a row.
- `inversion+cached`: the reference path's K/V from the cache (what EAA enrollment records).
- `recorded+rows`: the layout path's K/V and outputs recorded while stage 1 runs (no inversion).
- `recorded+cached`: both cheap paths: stage 1 + the target path only.
Reported per variant: UNet calls and rows per image (counted, not computed), seconds per image
(median of --repeats, one image, after a warm-up), and for --images seeds the distance of its
target images to the paper form's: max and mean absolute pixel difference and PSNR (images in
[0, 1]). For scale, the same distances of a plain generation with the identity (stage 1 without
its k steps of layout) to the paper form. The identity is a random folded SCA identity (the
branch the retouch stage-1 switches off for k steps); the reference image a seeded random image.
Random weights: the distances show the mechanism's effect on these models, not on SD1.5's.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = (("inversion", "rows"), ("inversion", "cached"), ("recorded", "rows"), ("recorded", "cached"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    p.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --preset tiny)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--images", type=int, default=4, help="seeds whose images are compared")
    p.add_argument("--repeats", type=int, default=3, help="timed retouches per variant (median)")
    p.add_argument("--prompt", default="a photo of a person on a beach at sunset")
    p.add_argument("--subject-token", type=int, default=4, help="the subject's position in the prompt's tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1 on CPU: steadier on a shared machine)")
    return p.parse_args(argv)


def distances(images, paper) -> dict:
    import torch

    diff = (images.float() - paper.float()).abs()
    mse = diff.pow(2).flatten(1).mean(1)
    psnr = [float("inf") if m == 0 else float(10 * torch.log10(1 / m)) for m in mse]
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db_min": min(psnr),
            "psnr_db_median": statistics.median(psnr)}


def main(argv=None) -> int:
    args = parse_args(argv)
    why = common.refusal(args)
    if why:
        print(f"bench_retouch.py: {why}", file=sys.stderr)
        return 2
    import torch

    from pidrt.models.attention import attention_layers
    from pidrt.models.build import build_random
    from pidrt.models.presets import get_preset
    from pidrt.models.retouch import RetouchConfig, swap_layers
    from pidrt.models.conditions import ScaleSchedule
    from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig
    from pidrt.runtime.retouch import RetouchOptions, RetouchSpec, reference_path, retouch

    device, dtype = torch.device(args.device), common.dtype_of(args)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    preset = get_preset(args.preset)
    models = build_random(preset, seed=args.seed)
    layers = attention_layers(models.unet)
    identity = common.few_token_conditions(models, layers, args.seed)[0]["sca"]
    pipe = Pipeline(models, device, dtype)
    side = preset.resolution
    sampling = SamplingConfig(steps=args.steps, guidance=args.guidance, height=side, width=side)
    # The published defaults are for 50 steps; other step counts keep their fractions.
    scale = args.steps / 50
    config = dataclasses.replace(RetouchConfig(), layout_steps=round(5 * scale), swap_start=round(4 * scale),
                                 reference_start=round(10 * scale))
    config.check(args.steps)
    names = [layer.name for layer in swap_layers(pipe.layers, config)]
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(args.seed + 100))
    common.sync(device)
    clock = time.perf_counter()
    ref = reference_path(pipe, pipe.encode_image(image), "a photo of a person", args.steps, names)
    common.sync(device)
    enroll_s = time.perf_counter() - clock
    kv_bytes = sum(t.numel() * t.element_size() for step in ref.kv for kv in step.values() for t in kv)

    def spec(seed):
        return RetouchSpec(ImageSpec(args.prompt, seed, condition=identity, schedule=ScaleSchedule(0.4)), ref,
                           (args.subject_token,))

    rows, images = [], {}
    for layout, reference in VARIANTS:
        name = f"{layout}+{reference}"
        options = RetouchOptions(layout, reference)
        row = {"variant": name}
        try:
            outs = [retouch(pipe, sampling, [spec(args.seed + i)], config, options) for i in range(args.images)]
            images[name] = torch.cat([o.images for o in outs])
            row["unet_calls"], row["unet_rows"] = outs[0].unet_calls, outs[0].unet_rows
            times = []
            for _ in range(args.repeats):
                common.sync(device)
                clock = time.perf_counter()
                retouch(pipe, sampling, [spec(args.seed)], config, options)
                common.sync(device)
                times.append(time.perf_counter() - clock)
            row["s_per_image"] = statistics.median(times)
        except Exception as exc:  # noqa: BLE001 (a failed variant is reported, the others measured)
            row["failed"] = common.failure(name, exc)
        rows.append(row)
    paper = images.get("inversion+rows")
    plain = torch.cat([pipe.generate(sampling, [spec(args.seed + i).image]).images for i in range(args.images)])
    for row in rows:
        if row["variant"] in images:
            row["vs_plain"] = distances(images[row["variant"]], plain)
        if paper is not None and row["variant"] in images:
            row["vs_paper"] = distances(images[row["variant"]], paper)
        if "s_per_image" in row and "s_per_image" in rows[0]:
            row["time_vs_paper"] = row["s_per_image"] / rows[0]["s_per_image"]
    plain_row = {"variant": "plain generation (for scale)", "vs_paper": distances(plain, paper) if paper is not None
                 else None}
    payload = {"meta": common.run_meta(device, preset=args.preset, dtype=str(dtype)),
               "config": {"steps": args.steps, "guidance": args.guidance, "images": args.images,
                          "repeats": args.repeats, "retouch": dataclasses.asdict(config), "side": side},
               "reference_enroll_s": enroll_s, "reference_kv_bytes": kv_bytes, "rows": rows + [plain_row]}
    table = [[r["variant"], sum(r.get("unet_calls", {}).values()) or None, sum(r.get("unet_rows", {}).values()) or None,
              r.get("s_per_image"), r.get("time_vs_paper"), (r.get("vs_paper") or {}).get("max_abs"),
              (r.get("vs_paper") or {}).get("mean_abs"), (r.get("vs_paper") or {}).get("psnr_db_median"),
              (r.get("vs_plain") or {}).get("mean_abs"), r.get("failed")] for r in rows + [plain_row]]
    md = (f"# Layout-and-Retouch variants: {args.preset}, {common.device_name(device)}, {args.steps} steps, "
          f"{side}px, {args.images} images\n\n"
          + common.md_table(["variant", "UNet calls / image", "UNet rows / image", "s / image", "x paper",
                             "max |diff| vs paper", "mean |diff| vs paper", "PSNR dB vs paper (median)",
                             "mean |diff| vs plain", "failed"], table)
          + f"\n\nReference path enrollment (inversion + reconstruction + projection): {enroll_s:.3g} s; "
          f"cached K/V of the edited layers: {kv_bytes / 2**20:.3g} MiB.\n")
    common.write_outputs(args.out, payload, md)
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

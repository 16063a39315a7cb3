"""`pidrt generate`: images from the command line through the same Generator the server runs.

    pidrt generate --prompt "a portrait" --face me.jpg --method ip --n 2 --out portraits/
    pidrt generate --prompt "a portrait" --identity ip-3f2a9c0d11b4e7a8 --store ~/.pidrt/identities --backend ort
    pidrt generate --prompt "a portrait" --identity ip-3f2a9c0d11b4e7a8 --init-image old.jpg --restore-face --upscale 2
    pidrt generate --prompt "a photo of <me> at the beach" --tokens me.safetensors --identity ip-3f2a9c0d11b4e7a8

The request is validated (with the HTTP API's messages) before any model loads. With `--face`
the photos are enrolled first (a stored entry for the same photos and models is reused), and so
is a `--tokens` file (a token identity: its placeholder must be in the prompt). Each
image is a PNG whose "parameters" text chunk carries the generation parameters in the line format
image tools read (prompt; "Negative prompt: ..."; "Steps: .., Sampler: .., CFG scale: .., Seed: ..,
Size: ..", plus pidrt's identity fields), and one JSON sidecar describes the run.

Outputs: `--out x.png` writes x.png (n > 1: x-0.png, x-1.png, ...) and x.json; `--out DIR` writes
DIR/pidrt-<seed>.png per image and DIR/pidrt-<first seed>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path

from pidrt.errors import PidrtError

SAMPLERS = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M"}  # the sampler names image tools show


def add_generate_parser(sub) -> argparse.ArgumentParser:
    from pidrt.engines.options import add_backend_arguments
    from pidrt.runtime.setup import add_runtime_arguments

    from pidrt.argtypes import RawDescriptionHelpFormatter, nonnegative_int, positive_float, positive_int
    from pidrt.identity.faces import BACKENDS
    from pidrt.runtime.edit_requests import add_edit_arguments

    p = sub.add_parser("generate", help="make images (optionally of an identity) with the serving Generator",
                       description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add_runtime_arguments(p, seed_option="--weights-seed")
    add_backend_arguments(p)
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--identity", help="a stored identity id (sca-…, ip-…, eaa-…)")
    who.add_argument("--face", type=Path, nargs="+", help="photos of one person, enrolled first")
    p.add_argument("--method", choices=["sca", "ip", "eaa"],
                   help="with --face: how to enroll (default ip); with --identity: must be the id's")
    p.add_argument("--tokens", help="a token identity: a stored id (tokens-…) or a token file, imported first; "
                                    "write its placeholder in --prompt (docs/token-identities.md)")
    p.add_argument("--placeholder", help="with a --tokens file: the prompt word it stands for (default: the file's)")
    p.add_argument("--scale", type=float, help="identity strength (default: the method's paper default, SCA 0.4, "
                                               "EAA 0.8, IP-Adapter 1.0, or the adapter file's)")
    p.add_argument("--scale-start", type=nonnegative_int, default=0, help="first step the identity branch acts on")
    # Range checked by the request, so the CLI and the HTTP API answer a bad count alike.
    p.add_argument("--steps", type=int,
                   help="sampling steps (default: 30; an EAA identity's recorded count; --face --method eaa: 50)")
    p.add_argument("--guidance", type=positive_float, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--seed", type=int, help="image i gets seed + i (default: random, written to the files)")
    p.add_argument("--n", type=positive_int, default=1, help="images")
    p.add_argument("--size", help="WxH, e.g. 512x512 (default: the preset's resolution)")
    p.add_argument("--scheduler", help="ddim (default) or dpm++2m")
    p.add_argument("--store", type=Path, default=Path("pidrt-store"), help="identity store (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("."), help="a .png file or a folder (default: %(default)s)")
    p.add_argument("--detector", default="auto", choices=BACKENDS, help="face detector for --face and --restore-face")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from pidrt.runtime.retouch_cli import add_retouch_arguments

    add_retouch_arguments(p)
    add_edit_arguments(p)
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(a: argparse.Namespace) -> int:
    from pidrt.engines.options import Bucket, Buckets, backend_options_from_args
    from pidrt.models.presets import get_preset
    from pidrt.runtime.edit_requests import edit_fields
    from pidrt.runtime.requests import GenerationRequest, GeneratorConfig, parse_size, resolve_request
    from pidrt.runtime.retouch_cli import retouch_from_args
    from pidrt.runtime.setup import runtime_options_from_args
    from pidrt.serve.factory import build_generator

    faces = []
    for path in a.face or ():
        if not path.is_file():
            raise PidrtError(f"{path}: no such image file")
        faces.append(path.read_bytes())
    width, height = parse_size(a.size)
    method = a.method or ("ip" if faces else None)
    mode, retouch = retouch_from_args(a)
    token_file = Path(a.tokens) if a.tokens and Path(a.tokens).is_file() else None
    if a.tokens and token_file is None and not a.tokens.startswith("tokens-"):
        raise PidrtError(f"--tokens {a.tokens}: no such token file, and not a token identity id (tokens-…)")
    request = GenerationRequest(a.prompt, a.negative_prompt, a.identity, method if a.identity else None, a.scale,
                                a.scale_start, None, a.steps, a.guidance, a.seed, width, height, a.n, "png", None,
                                a.scheduler, tokens=None if token_file else a.tokens, mode=mode, retouch=retouch,
                                **edit_fields(a))
    runtime = runtime_options_from_args(a)
    config = GeneratorConfig(max_batch=max(1, a.n), timeout_s=86400.0,
                             enroll_detector=a.detector)
    # Bad input fails before any model loads; --face's identity, enrolled later, stands in as an id.
    stand_in = f"{method}-{'0' * 16}" if faces else None
    resolved = resolve_request(dataclasses.replace(request, identity=request.identity or stand_in), config,
                               get_preset(runtime.preset))
    backend = backend_options_from_args(a)
    # Prepare exactly this run: its shape, the UNet graph of its method; an engine server enrolling
    # EAA keeps the torch UNet it records features with. No separate warm-up: the one generation
    # pays a first call's costs either way.
    need = resolved.method or method
    backend = dataclasses.replace(
        backend, warmup=False, buckets=backend.buckets or Buckets((Bucket(resolved.width, resolved.height, resolved.n),)),
        methods=backend.methods or ((need,) if need else ("none",)),
        keep_torch_unet=backend.keep_torch_unet or (bool(faces) and (method == "eaa" or retouch is not None)),
        retouch_blocks=backend.retouch_blocks or ((10, 16) if retouch is not None else None))
    generator = build_generator(a.store, runtime, config, backend, progress=not a.no_progress)
    try:
        enrolled, identity = None, request.identity
        if faces:
            from pidrt.identity.enroll import EnrollOptions

            # EAA: --steps, else the enrollment default (the paper's 50), as `pidrt enroll`; the
            # generation then runs the identity's recorded count.
            # A retouch records the reference path for this run's steps and size.
            options = ({"resolution": resolved.width, "steps": resolved.steps if retouch else a.steps or EnrollOptions.steps}
                       if method == "eaa" or retouch else {})
            if retouch is not None:
                options["retouch"] = True
            enrolled = generator.enroll(faces, method, names=tuple(str(p) for p in a.face), **options)
            identity = enrolled.identity_id
        tokens = request.tokens
        if token_file is not None:
            tokens = generator.enroll([token_file.read_bytes()], "tokens", names=(str(token_file),),
                                      placeholder=a.placeholder).identity_id
        # Again with the generator's own defaults: the method's scale (adapter metadata, else the
        # paper's) and an EAA identity's recorded step count; the seeds drawn above are kept.
        resolved = generator.resolve(dataclasses.replace(request, identity=identity, tokens=tokens,
                                                         seed=list(resolved.seeds)))
        result = _run(generator, resolved, progress=not a.no_progress)
    finally:
        generator.close()
    files = write_outputs(result, a.out, generator, enrolled)
    print(json.dumps({"images": [str(f) for f in files["images"]], "sidecar": str(files["sidecar"]),
                      "seeds": list(result.request.seeds), "backend": result.backend}))
    return 0


def _run(generator, request, progress: bool):
    from tqdm import tqdm

    with tqdm(total=request.steps, desc="generating", unit="step", disable=not progress, leave=False) as bar:
        def on_event(ev) -> None:
            if ev.type == "step":
                bar.total = ev.steps  # a retouch runs several loops
                bar.update(ev.step - bar.n)

        return generator.submit(request, on_event).result()


def parameters_text(result, image, model: str, device: str) -> str:
    """The "parameters" text chunk, in the line format image tools parse."""
    r = result.request
    fields = {"Steps": r.steps, "Sampler": SAMPLERS.get(r.scheduler, r.scheduler), "CFG scale": r.guidance,
              "Seed": image.seed, "Size": f"{r.width}x{r.height}", "Model": model, "Backend": result.backend,
              "Device": device}
    if r.edit is not None:  # image tools' name for an img2img strength
        fields["Denoising strength"] = r.edit.describe()["strength"]
    if r.identity:
        fields |= {"Identity": r.identity, "Identity method": r.method, "Identity scale": r.scale,
                   "Identity scale start": r.scale_start}
    if r.tokens:
        fields["Tokens"] = r.tokens
    from pidrt import __version__

    fields["Version"] = f"pidrt {__version__}"
    lines = [r.prompt] + ([f"Negative prompt: {r.negative_prompt}"] if r.negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields.items())])


def png_with_parameters(data: bytes, text: str) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def output_paths(out: Path, seeds) -> tuple[list[Path], Path]:
    if out.suffix.lower() == ".png":
        images = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(len(seeds))]
        return images, out.with_suffix(".json")
    return [out / f"pidrt-{s}.png" for s in seeds], out / f"pidrt-{seeds[0]}.json"


def write_outputs(result, out: Path, generator, enrolled=None) -> dict:
    from pidrt.fileio import atomic_write

    r = result.request
    model, device = str(generator.pipe.models.name), str(generator.pipe.device)
    images, sidecar = output_paths(Path(out), r.seeds)
    for path, image in zip(images, result.images):
        atomic_write(path, png_with_parameters(image.data, parameters_text(result, image, model, device)))
    meta = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seeds": list(r.seeds),
            "images": [{"file": p.name, "seed": i.seed} for p, i in zip(images, result.images)],
            "identity": r.identity, "method": r.method, "tokens": r.tokens, "scale": r.scale, "scale_start": r.scale_start,
            "scale_end": r.scale_end, "steps": r.steps, "guidance": r.guidance, "scheduler": r.scheduler,
            "size": f"{r.width}x{r.height}", "backend": result.backend, "device": device,
            "dtype": str(generator.pipe.dtype).removeprefix("torch."), "model": model, "timings": result.timings,
            "edit": None if r.edit is None else r.edit.describe(),
            "enrolled": None if enrolled is None else {"id": enrolled.identity_id, "created": enrolled.created,
                                                       "seconds": round(enrolled.seconds, 3)}}
    from pidrt.runtime.retouch_cli import write_layouts

    layouts = write_layouts(result, images)
    if r.retouch is not None:
        meta["retouch"] = {**r.retouch.as_dict(), "layouts": [p.name for p in layouts],
                           "unet_calls": result.images[0].unet_calls}
    atomic_write(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
    print(f"wrote {len(images)} image(s) and {sidecar}", file=sys.stderr)
    return {"images": images, "sidecar": sidecar}

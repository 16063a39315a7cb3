"""The `pidrt` command line. Arguments are validated here and turned into frozen configs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pidrt.argtypes import HelpFormatter, nonnegative_int, positive_int
from pidrt.errors import PidrtError
from pidrt.models.presets import PRESETS
from pidrt.runtime.setup import add_runtime_arguments, runtime_options_from_args

HELP_FORMAT = HelpFormatter  # every option's help line shows its default


def cmd_demo(a: argparse.Namespace) -> int:
    from pidrt.runtime.demo import NOTE, DemoConfig, run_demo

    config = DemoConfig(out=a.out, steps=a.steps, face=a.face, seed=a.seed, detector=a.detector)  # checked first
    print(f"pidrt demo: {NOTE}", file=sys.stderr)
    report = run_demo(config)
    print(json.dumps({"out": str(a.out), "images": report["images"], "face_detector": report["face_detector"],
                      "device": report["device"], "stages_s": report["stages_s"],
                      "folded_vs_unfolded_max_abs": report["folded_vs_unfolded_max_abs"]}, indent=2))
    return 0


def cmd_enroll(a: argparse.Namespace) -> int:
    from pidrt.identity.enroll import Enroller, EnrollOptions
    from pidrt.identity.store import IdentityStore
    from pidrt.runtime.setup import build_runtime

    if (a.method == "tokens") != (a.tokens is not None) or (a.method == "tokens") == bool(a.face):
        raise PidrtError("--method tokens takes --tokens FILE and no --face; sca, ip and eaa take --face photos")
    if a.method == "tokens":
        return _enroll_tokens(a)
    images = []
    for path in a.face:
        if not path.is_file():
            raise PidrtError(f"{path}: no such image file")
        images.append(path.read_bytes())
    options = EnrollOptions(a.method, steps=a.steps, resolution=a.resolution, caption=a.caption,
                            record_from=a.record_from, face_policy=a.face_policy, detector=a.detector,
                            names=tuple(str(p) for p in a.face), retouch=a.retouch)
    if a.adapter is not None:
        setattr(a, f"{a.method}_adapter", a.adapter)
    store = IdentityStore(a.store)  # a bad --store fails before the models load
    pipe, encoders = build_runtime(runtime_options_from_args(a))
    result = Enroller(pipe, store, encoders).enroll(images, options)
    print(json.dumps({"id": result.identity_id, "method": result.method, "created": result.created,
                      "seconds": round(result.seconds, 3), "face_detector": result.detector,
                      "retouch_reference": result.retouch_reference}))
    return 0


def _enroll_tokens(a: argparse.Namespace) -> int:
    from pidrt.identity.enroll import Enroller
    from pidrt.identity.store import IdentityStore
    from pidrt.runtime.setup import build_runtime

    from pidrt.identity.token_files import load_tokens
    from pidrt.models.presets import get_preset

    load_tokens(a.tokens, get_preset(a.preset).text.hidden_size, a.placeholder)  # a bad file fails before models load
    store = IdentityStore(a.store)
    pipe, encoders = build_runtime(runtime_options_from_args(a))  # the text encoder's width, the base model
    result = Enroller(pipe, store, encoders).enroll_tokens(a.tokens.read_bytes(), str(a.tokens), a.placeholder)
    print(json.dumps({"id": result.identity_id, "method": result.method, "created": result.created,
                      "seconds": round(result.seconds, 3)}))
    return 0


def cmd_identities(a: argparse.Namespace) -> int:
    from pidrt.identity.store import IdentityStore
    from pidrt.identity.token_store import summary

    store = IdentityStore(a.store, create=False)  # only writers create stores
    if a.action == "list":
        for e in store.list():
            print(json.dumps({"id": e.id, "method": e.method, "created": e.created, "bytes": e.size, **summary(e)}))
    elif a.action == "show":
        e = store.show(a.id)
        print(json.dumps({"id": e.id, "method": e.method, "created": e.created, "bytes": e.size, "key": e.key,
                          "meta": e.meta, "tensors": len(e.tensors), **summary(e)}, indent=2, default=str))
    else:
        from pidrt.identity.retouch_reference import ReferenceStore

        store.delete(a.id)
        ReferenceStore(store).discard(a.id)  # its retouch reference goes with it
        print(json.dumps({"deleted": a.id}))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from pidrt.serve.app import config_from_args, serve_main

    return serve_main(config_from_args(a))


def cmd_export(a: argparse.Namespace) -> int:
    from pidrt.export.commands import ExportOptions, export_models
    from pidrt.export.specs import SpecOptions

    if a.model is not None:
        from pidrt.models.loading import load_models
        from pidrt.models.presets import get_preset

        source = load_models(a.model, get_preset(a.preset))
    else:
        source = a.preset
    from pidrt.engines.options import retouch_blocks

    options = ExportOptions(spec=SpecOptions(plugins=a.trt_plugins, retouch_blocks=retouch_blocks(a)))
    manifest = export_models(source, a.method, a.out, fp16=a.fp16, options=options)
    print(json.dumps({"manifest": str(manifest)}))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from pidrt.export.commands import verify

    report = verify(a.dir, a.backend)
    failed = [name for name, r in report["graphs"].items()
              if (r["max_abs"] > a.atol if r["dtype"] == "float32" else r["max_rel"] > a.rtol_fp16)]
    report["ok"] = not failed
    report["failed"] = failed
    report["tolerance"] = {"float32_max_abs": a.atol, "float16_max_rel": a.rtol_fp16}
    print(json.dumps(report))
    return 1 if failed else 0


def cmd_build(a: argparse.Namespace) -> int:
    from pidrt.export.commands import build

    print(json.dumps({"engines": [str(p) for p in build(a.dir, a.backend)]}))
    return 0


def cmd_kernels(a: argparse.Namespace) -> int:
    import os

    import torch

    from pidrt.errors import require
    from pidrt.fileio import atomic_write
    from pidrt.models.presets import get_preset

    require("triton", "kernels")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise PidrtError("pidrt kernels compiles for a GPU architecture; unset TRITON_INTERPRET (it makes the "
                         "kernels interpreter functions, which cannot be compiled)")
    from pidrt.kernels.catalog import compile_variant, markdown, report_meta, variants

    rows = []
    for variant in variants(get_preset(a.preset)):
        for dtype in (getattr(torch, d) for d in a.dtype):
            if variant.form in a.form and dtype in variant.dtypes:
                print(f"compiling {variant.form} {variant.label} {dtype} for sm_{a.arch}", file=sys.stderr)
                rows.append(compile_variant(variant, a.arch, dtype, a.out, a.max_ptx_version))
    table = markdown(rows, f"Triton kernel resources, {a.preset} preset, sm_{a.arch} (ptxas, compiled without a GPU)")
    if a.out is not None:
        report = {"meta": report_meta(a.preset, a.arch), "rows": [r.to_json() for r in rows]}
        atomic_write(a.out / "report.json", json.dumps(report, indent=2).encode())
        atomic_write(a.out / "report.md", table.encode())
    print(table, end="")
    over = [f"{r.form} {r.variant} {r.dtype}" for r in rows if not r.fits]
    if over and a.fail_on_spill:
        print(f"pidrt: register spills or shared memory over the launch's limit in {', '.join(over)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    import importlib.util
    import platform
    import subprocess

    import torch

    report = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for module, extra in (("onnx", "onnx"), ("onnxruntime", "onnx"), ("polygraphy", "onnx"), ("tensorrt", "trt"),
                          ("triton", "kernels"), ("insightface", "face"), ("cv2", "face"), ("fastapi", "serve"),
                          ("ray", "serve")):
        found = importlib.util.find_spec(module) is not None
        report[module] = "installed" if found else f"missing (pip install 'pidrt[{extra}]')"
    from pidrt.engines.base import doctor_report
    from pidrt.kernels import available

    report["kernels"] = available()[1]
    if importlib.util.find_spec("triton") is not None:
        from pidrt.kernels.aot import driver_ptx_version, isa_text, toolchain_ptx_version

        # TensorRT plugin engines load PTX through the driver: it must take what Triton writes.
        try:
            writes = isa_text(toolchain_ptx_version(90))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a Triton without its ptxas
            writes = f"unknown ({type(exc).__name__}: {exc})"
        report["ptx_isa"] = {"triton_writes": writes,
                             "cuda_driver_takes": isa_text(v) if (v := driver_ptx_version()) else "no CUDA driver"}
    from pidrt.kernels.native import doctor_report as native_report

    report["native_kernels"] = native_report()  # the CMake-built library (docs/native.md)
    report["backends"] = doctor_report()
    from pidrt.identity.faces import detector_report

    report["face_detectors"] = detector_report()
    print(json.dumps(report, indent=2))
    return 0


def _command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary, formatter_class=HELP_FORMAT)


def build_parser() -> argparse.ArgumentParser:
    from pidrt.identity.faces import BACKENDS as DETECTORS

    parser = argparse.ArgumentParser(prog="pidrt", description="Personalized-identity SD1.5 runtime",
                                     formatter_class=HELP_FORMAT)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "demo", "enroll a face with every method on the tiny preset (random weights) and generate")
    p.add_argument("--out", type=Path, default=Path("pidrt-demo"), help="folder for the images and report.json")
    p.add_argument("--steps", type=positive_int, default=10, help="sampling (and EAA inversion) steps")
    p.add_argument("--face", type=Path, default=None,
                   help="your face photo (default: a sample photo shipped in scikit-image or insightface)")
    p.add_argument("--seed", type=nonnegative_int, default=42, help="seed of every image")
    p.add_argument("--detector", choices=DETECTORS, default="auto", help="face detector")
    p.set_defaults(func=cmd_demo)

    p = _command(sub, "enroll", "enroll face images (or import a token file) as an identity; prints its id")
    add_runtime_arguments(p)
    p.add_argument("--method", choices=["sca", "ip", "eaa", "tokens"], required=True, help="identity method")
    p.add_argument("--face", type=Path, nargs="+", help="face photos of one person (sca, ip, eaa)")
    p.add_argument("--tokens", type=Path, help="--method tokens: a token file (pidrt, diffusers or A1111 "
                                               "textual inversion; docs/token-identities.md)")
    p.add_argument("--placeholder", help="--method tokens: the prompt word it stands for (default: the file's)")
    p.add_argument("--store", type=Path, required=True, help="identity store folder (created if missing)")
    p.add_argument("--steps", type=positive_int, default=50,
                   help="EAA: sampling steps the features are for (its generations default to it)")
    p.add_argument("--resolution", type=positive_int, default=None, help="EAA: image side (default: the preset's)")
    p.add_argument("--caption", default="a photo of a person", help="EAA: inversion prompt")
    p.add_argument("--record-from", choices=["reconstruction", "inversion"], default="reconstruction",
                   help="EAA: record features in the paper's reconstruction pass, or the cheaper inversion pass")
    p.add_argument("--face-policy", choices=["largest", "error"], default="largest",
                   help="several faces in a photo: use the largest, or refuse")
    p.add_argument("--detector", choices=DETECTORS, default="auto", help="face detector")
    p.add_argument("--adapter", type=Path, default=None,
                   help="the adapter file of --method (same as --sca/--ip/--eaa-adapter)")
    p.add_argument("--retouch", action="store_true",
                   help="also record the Layout-and-Retouch reference path (--steps, --resolution, --caption; "
                        "2 x steps UNet calls, once) for generations with mode retouch")
    p.set_defaults(func=cmd_enroll)

    p = _command(sub, "identities", "list, show or delete stored identities")
    p.add_argument("action", choices=["list", "show", "delete"], help="what to do")
    p.add_argument("id", nargs="?", help="identity id (show, delete)")
    p.add_argument("--store", type=Path, required=True, help="identity store folder (must exist)")
    p.set_defaults(func=cmd_identities)

    p = _command(sub, "export", "export ONNX graphs with identity inputs + manifest.json (docs/engines.md)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shapes")
    p.add_argument("--model", type=Path, default=None, help="real weights (default: the preset's random weights)")
    p.add_argument("--method", choices=["none", "sca", "ip", "eaa"], default="none",
                   help="identity inputs of the UNet graph")
    p.add_argument("--out", type=Path, required=True, help="export folder (created if missing)")
    p.add_argument("--fp16", action="store_true", help="float16 graphs")
    p.add_argument("--trt-plugins", action="store_true",
                   help="UNet identity branches as pidrt TensorRT plugin nodes (fused Triton kernels compiled into "
                        "the engine) instead of plain ops; onnxruntime runs them lowered to plain ops")
    p.add_argument("--retouch", action="store_true",
                   help="UNet graph with Layout-and-Retouch inputs (swap, blend, subject maps: docs/retouch.md); "
                        "it serves plain requests too")
    p.add_argument("--retouch-blocks", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="with --retouch: the transformer blocks whose self-attention it edits (default: 10 16)")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "verify", "run exported graphs against the torch reference; exit 1 above tolerance")
    p.add_argument("dir", type=Path, help="export folder")
    p.add_argument("--backend", default="ort", choices=["ort", "trt", "torch"], help="runtime to check")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed for fp32 graphs")
    p.add_argument("--rtol-fp16", type=float, default=2e-2, help="max relative error allowed for fp16 graphs")
    p.set_defaults(func=cmd_verify)

    p = _command(sub, "build", "build TensorRT engines for an export folder")
    p.add_argument("dir", type=Path, help="export folder")
    p.add_argument("--backend", default="trt", choices=["trt"],
                   help="engines built ahead of time (onnxruntime builds its sessions when opened)")
    p.set_defaults(func=cmd_build)

    p = _command(sub, "kernels", "compile the Triton kernels for a GPU architecture (no GPU needed); "
                 "report registers, spills and shared memory (docs/engines.md)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd15", help="model shapes")
    p.add_argument("--arch", type=int, default=90, help="compute capability as major*10+minor (90: H100/H200)")
    p.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"],
                   default=["float16", "bfloat16", "float32"], help="of the dtypes each variant runs in, these")
    p.add_argument("--form", nargs="+", choices=["plugin", "jit"], default=["plugin", "jit"],
                   help="TensorRT plugin plans and/or what pidrt's launchers have Triton's JIT compile")
    p.add_argument("--out", type=Path, help="folder for the PTX files and report.json / report.md")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="exit 1 when any variant spills registers or needs more shared memory than its launch gets")
    p.add_argument("--max-ptx-version", type=int, default=None,
                   help="cap the PTX ISA, e.g. 90 for a CUDA 13.0 driver (default: the bundled ptxas's)")
    p.set_defaults(func=cmd_kernels)

    p = _command(sub, "serve", "the HTTP service (docs/serving.md)")
    from pidrt.serve.app import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from pidrt.runtime.generate import add_generate_parser

    add_generate_parser(sub)

    from pidrt.bench.cli import add_bench_parser

    add_bench_parser(sub)

    p = _command(sub, "doctor", "what is installed: packages, backends, face detectors, the PTX ISA")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "action", None) in ("show", "delete") and not args.id:
        parser.error(f"identities {args.action} needs an identity id")
    try:
        return args.func(args)
    except PidrtError as exc:
        print(f"pidrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

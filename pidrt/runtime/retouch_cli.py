"""`pidrt generate --mode retouch ...`: the retouch options of the command line and its outputs.

    pidrt generate --mode retouch --prompt "a photo of a man on a beach" --subject man \
        --identity ip-3f2a9c0d11b4e7a8 --steps 50 --return-layout --out beach.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pidrt.errors import PidrtError


def add_retouch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retouch (--mode retouch, docs/retouch.md; steps left out: the published ones "
                             "for 50 steps, scaled to --steps)")
    g.add_argument("--mode", choices=["generate", "retouch"], default="generate",
                   help="retouch: Layout-and-Retouch (a layout stage, then the identity's details put back)")
    g.add_argument("--subject", help="words of the prompt whose attention makes the blend mask, e.g. 'man'")
    g.add_argument("--layout-steps", type=int, help="k: first steps with the identity branch off (5 of 50)")
    g.add_argument("--swap-start", type=int, help="first step of the K/V swap (4 of 50)")
    g.add_argument("--reference-start", type=int, help="first step reading the reference path (10 of 50)")
    g.add_argument("--blend-start", type=int, help="first step of the mask blend (default: --reference-start)")
    # Not --mask: that is the edit's repaint mask (docs/edits.md).
    g.add_argument("--subject-mask", type=Path, help="the subject's foreground mask (image of --size; white = subject)")
    g.add_argument("--return-layout", action="store_true", help="also write each layout image (<image>-layout.png)")
    g.add_argument("--layout-path", choices=["inversion", "recorded"], default="inversion",
                   help="inversion: the paper's (the layout image is inverted); recorded: stage 1's trajectory "
                        "is kept (T fewer UNet calls; torch UNet only)")


def retouch_from_args(a: argparse.Namespace):
    """(mode, RetouchRequest or None) of the command line; retouch options need --mode retouch."""
    from pidrt.runtime.retouch_requests import RetouchRequest

    given = [name for name in ("subject", "layout_steps", "swap_start", "reference_start", "blend_start",
                               "subject_mask")
             if getattr(a, name) is not None] + (["return_layout"] if a.return_layout else [])
    if a.mode != "retouch":
        if given:
            raise PidrtError(f"--{given[0].replace('_', '-')} goes with --mode retouch")
        return a.mode, None
    mask = None
    if a.subject_mask is not None:
        if not a.subject_mask.is_file():
            raise PidrtError(f"{a.subject_mask}: no such mask image")
        mask = a.subject_mask.read_bytes()
    return a.mode, RetouchRequest(a.subject, a.layout_steps, a.swap_start, a.reference_start, a.blend_start, mask,
                                  a.return_layout, a.layout_path)


def layout_paths(images: list[Path]) -> list[Path]:
    return [p.with_name(f"{p.stem}-layout.png") for p in images]


def write_layouts(result, images: list[Path]) -> list[Path]:
    """Each image's layout (when the request asked for it) beside it; the paths written."""
    from pidrt.fileio import atomic_write

    written = []
    for path, image in zip(layout_paths(images), result.images):
        if image.layout is not None:
            atomic_write(path, image.layout)
            written.append(path)
    return written

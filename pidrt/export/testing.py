"""Exports of the `tiny` preset shared by the test suites (and handy for trying the backends).

Tracing a UNet is the slow part of the export tests (seconds each), and tests/export and
tests/engines both need the same graphs, so one process-wide folder holds them: the first call
exports, later calls hit the manifest's cache check and return at once.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from pidrt.export.commands import ExportOptions, export_models
from pidrt.export.specs import SpecOptions

_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="pidrt-tiny-export-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def tiny_export(method: str = "none", fp16: bool = False, kinds: tuple[str, ...] = ("unet",),
                seed: int = 0, preset: str = "tiny", retouch_blocks: tuple[int, int] | None = None) -> Path:
    """The folder holding the tiny `kinds` graphs (UNets of every method requested so far);
    preset "tiny-inpainting" for the 9-channel UNet.

    retouch_blocks: UNets with retouch inputs, in a folder of their own (one UNet per method there).
    """
    out = _root() / f"{preset}-seed{seed}-{'fp16' if fp16 else 'fp32'}{'-retouch' if retouch_blocks else ''}"
    export_models(preset, method, out, fp16,
                  ExportOptions(kinds=kinds, seed=seed, spec=SpecOptions(retouch_blocks=retouch_blocks)))
    return out

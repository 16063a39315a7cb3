"""`manifest.json` of an export folder: which graphs it holds, their specs and hashes.

The manifest is the commit point of an export: a graph counts as present only once the
manifest (written atomically, after the graph files) names it with its key and size, so a
crash mid-export leaves either the old graph or the new one, never a half-written one in use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pidrt.errors import FormatError, PidrtError
from pidrt.export.specs import ModelSpec
from pidrt.fileio import atomic_write

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph as the manifest records it."""

    dir: Path
    name: str
    spec: ModelSpec
    file: str
    data: str | None  # external-data file name (graphs over 2 GB)
    key: str  # graph_key: weights fingerprint + spec (+ export format)
    weights: str  # fingerprint of the torch module the graph was traced from
    bytes: int
    source: dict  # preset, models name (how `verify` rebuilds a reference)

    @property
    def path(self) -> Path:
        return self.dir / self.file

    @classmethod
    def from_json(cls, folder: Path, name: str, d: dict) -> GraphEntry:
        try:
            return cls(Path(folder), name, ModelSpec.from_json(d["spec"]), d["file"], d.get("data"), d["key"],
                       d["weights"], int(d["bytes"]), dict(d.get("source", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{Path(folder) / MANIFEST}: graph {name!r} entry is malformed ({exc!r})") from None

    def files_present(self) -> bool:
        size = self.path.stat().st_size if self.path.is_file() else -1
        if self.data:
            data = self.dir / self.data
            size = size + data.stat().st_size if data.is_file() and size >= 0 else -1
        return size == self.bytes


def read_manifest(folder: Path | str, missing_ok: bool = False) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return {"format": FORMAT, "graphs": {}}
        raise PidrtError(f"{path}: no export manifest; run `pidrt export` into {Path(folder)} first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("graphs"), dict):
        raise FormatError(f"{path}: manifest format {manifest.get('format')!r}, this pidrt reads {FORMAT}")
    return manifest


def write_manifest(folder: Path | str, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


def graph_entries(folder: Path | str) -> dict[str, GraphEntry]:
    manifest = read_manifest(folder)
    return {name: GraphEntry.from_json(Path(folder), name, d) for name, d in manifest["graphs"].items()}


def find_graph(folder: Path | str, kind: str, method: str = "none", dtype: str | None = None,
               retouch: bool | None = None) -> GraphEntry:
    """The graph of `kind` (and `method` for UNets; `dtype` when both fp32 and fp16 are there;
    `retouch`: a UNet with (True) or without (False) Layout-and-Retouch inputs, None: either)."""
    entries = graph_entries(folder)
    found = [e for e in entries.values()
             if e.spec.kind == kind and (kind != "unet" or e.spec.method == method)
             and (dtype is None or e.spec.dtype == dtype)
             and (retouch is None or bool(e.spec.retouch_layers) == retouch)]
    if len(found) != 1:
        what = (f"{kind}" + (f" ({method})" if kind == "unet" else "") + (f" {dtype}" if dtype else "")
                + ({True: " with retouch inputs", False: " without retouch inputs"}.get(retouch, "")))
        have = sorted(entries)
        raise PidrtError(f"{Path(folder)}: {'no' if not found else 'several'} {what} graph(s); have {have}"
                         + ("; pass dtype" if found else ""))
    return found[0]


def models_from_source(source: dict):
    """Rebuild the torch models a graph was exported from, when its source says how (random presets).

    Checkpoint-loaded models cannot be rebuilt from the manifest alone: the caller passes them.
    """
    from pidrt.models.build import build_random
    from pidrt.models.presets import get_preset

    name = str(source.get("models", ""))
    parts = name.split(":")
    if len(parts) == 3 and parts[0] == "random" and parts[2].startswith("seed="):
        return build_random(get_preset(parts[1]), int(parts[2].removeprefix("seed=")))
    raise PidrtError(f"the graphs were exported from {name!r}; pass those models (models=...) to run the "
                     "torch reference")

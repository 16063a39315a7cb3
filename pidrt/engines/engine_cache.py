"""The engine cache: exported graphs (and TensorRT plans) kept between server starts.

An entry is a folder ``<root>/<label>-<key20>/`` holding an export folder (manifest.json, the
graph, for trt its plan under engines/) and ``entry.json``: the key record, and the byte size and
sha256 of every file. The key record holds everything the engine depends on (the chooser builds
it: weights and adapter-architecture fingerprints, method, dtype, shape profile, device, the
versions of torch, the exporter and the backend); the folder name is its hash, so a changed input
maps to a new entry and entries never need invalidation.

Entries are built in a temp folder beside their final name and renamed into place once
entry.json is written (a reader sees a whole entry or none). Every open verifies entry.json
against the requested record and every file against its hash, as the identity store does; an
entry that fails is reported, removed and rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from pidrt.errors import FormatError, PidrtError
from pidrt.fileio import atomic_write, fsync_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENTRY = "entry.json"
TEMP_MAX_AGE_S = 24 * 3600.0  # temp folders older than this belong to a build that died


class CorruptEngineEntry(FormatError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"corrupt engine cache entry {path}: {reason}")
        self.path, self.reason = Path(path), reason


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "pidrt" / "engines"


def record_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ENTRY}


class EngineCache:
    """Verified, atomically written engine folders under `root`; safe across processes."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def path(self, label: str, record: dict) -> Path:
        return self.root / f"{label}-{record_key(record)[:20]}"

    def verify(self, folder: Path, record: dict) -> None:
        """CorruptEngineEntry unless `folder` is a whole entry for `record` with unchanged files."""
        try:
            entry = json.loads((folder / ENTRY).read_text())
        except FileNotFoundError:
            raise CorruptEngineEntry(folder, f"no {ENTRY} (an interrupted build?)") from None
        except (OSError, ValueError) as exc:
            raise CorruptEngineEntry(folder, f"{ENTRY} is unreadable ({exc})") from None
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            raise CorruptEngineEntry(folder, f"format {entry.get('format') if isinstance(entry, dict) else None!r}, "
                                             f"this pidrt reads {CACHE_FORMAT}")
        if entry.get("key") != record_key(record) or entry.get("record") != json.loads(json.dumps(record, default=str)):
            raise CorruptEngineEntry(folder, "its key record does not match what this start needs")
        files = entry.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptEngineEntry(folder, "no file list")
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                raise CorruptEngineEntry(folder, f"{name} is missing")
            if path.stat().st_size != want.get("bytes"):
                raise CorruptEngineEntry(folder, f"{name} is {path.stat().st_size} bytes, {want.get('bytes')} recorded")
            if _sha256(path) != want.get("sha256"):
                raise CorruptEngineEntry(folder, f"{name}: sha256 mismatch (the file changed)")

    def get_or_build(self, label: str, record: dict, build: Callable[[Path], None]) -> tuple[Path, str]:
        """(entry folder, "hit" | "built" | "rebuilt"); `build(folder)` writes the files of a miss."""
        final = self.path(label, record)
        status = "built"
        if final.exists():
            try:
                self.verify(final, record)
                return final, "hit"
            except CorruptEngineEntry as exc:
                log.warning("%s; rebuilding it", exc)
                status = "rebuilt"
                self._remove(final)
        tmp = self.root / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            entry = {"format": CACHE_FORMAT, "key": record_key(record), "record": record, "files": _files(tmp),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write(tmp / ENTRY, (json.dumps(entry, indent=1, sort_keys=True, default=str) + "\n").encode())
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same entry first: use it if it verifies.
                self.verify(final, record)
                self._remove(tmp)
                return final, "hit"
            fsync_dir(self.root)
        except BaseException:
            self._remove(tmp)
            raise
        return final, status

    @staticmethod
    def _remove(folder: Path) -> None:
        # Renamed aside first, so no reader ever sees a half-deleted entry under its real name.
        aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def _sweep(self) -> None:
        limit = time.time() - TEMP_MAX_AGE_S
        for p in self.root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < limit:
                    shutil.rmtree(p, ignore_errors=True)


def check_writable(root: Path) -> None:
    """Fail at start, not at the first export, when the cache folder cannot be written."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe = Path(root) / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PidrtError(f"engine cache {root} is not writable ({exc}); pass --engine-cache DIR") from None

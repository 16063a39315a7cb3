"""Content-addressed store of identity artifacts (docs/identity-store.md).

Enrolling a face is expensive (an encoder pass for SCA/IP, a fine-tune for EAA) while its result
is small, so it is computed once and kept as ``root/<id>.safetensors``. The id is a hash of
everything the result depends on (``IdentityKey``): the same inputs always map to the same file,
and changing any input maps to a new one, so entries never need invalidation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pidrt.errors import FormatError, PidrtError
from pidrt.fileio import atomic_write, fsync_dir

# Re-exported: callers build keys and fingerprints through the store module.
from pidrt.identity.key import (  # noqa: F401
    ID_RE,
    METHODS,
    SHA256_RE,
    IdentityKey,
    fingerprint_module,
    fingerprint_tensors,
)

__all__ = [
    "CorruptEntryError", "EntryInfo", "IdentityKey", "IdentityStore", "METHODS", "UnknownIdentityError",
    "fingerprint_module", "fingerprint_tensors",
]

log = logging.getLogger(__name__)

# Schema 2 covers the caller metadata (query, n_tokens, EAA steps and caption, ...) by `meta_sha256`;
# schema 1 entries did not, so they are reported as corrupt and rebuilt rather than trusted.
SCHEMA_VERSION = "2"
RESERVED_META = ("pidrt_schema", "id", "method", "key", "created", "payload_sha256", "meta_sha256")
SUFFIX = ".safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger length field is garbage


class CorruptEntryError(FormatError):
    """A stored entry failed verification; ``path`` and ``reason`` say which file and why,
    ``id`` which identity (what a message to a remote client names instead of the path)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"corrupt identity entry {path}: {reason}")
        self.path, self.reason = Path(path), reason
        self.id = self.path.name.removesuffix(SUFFIX)

    def __reduce__(self):  # picklable with its fields (Ray ships exceptions between processes)
        return (type(self), (self.path, self.reason))


class UnknownIdentityError(PidrtError, KeyError):
    """No entry with that id; a KeyError so mapping-style callers can catch it as one."""

    __str__ = Exception.__str__  # KeyError would repr() the message


@dataclass
class EntryInfo:
    id: str
    method: str
    created: str
    size: int  # bytes on disk
    key: IdentityKey
    meta: dict[str, str]  # caller metadata only
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)


def _to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise PidrtError(f"identity tensors must map str -> torch.Tensor (entry {name!r})")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses two names sharing storage (tied tensors); store them separately.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _parse_header(data: bytes, path: Path, file_size: int) -> tuple[dict, dict[str, str]]:
    """Return ({name: (dtype, shape)}, metadata) from the safetensors header starting ``data``."""
    if len(data) < 8:
        raise CorruptEntryError(path, f"file is {file_size} bytes, shorter than the header length field")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CorruptEntryError(path, f"header length {n} does not fit the {file_size}-byte file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptEntryError(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptEntryError(path, "header has no string->string metadata")
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        summary = {k: (str(e["dtype"]), tuple(int(d) for d in e["shape"])) for k, e in sorted(header.items())}
    except (TypeError, KeyError, IndexError, ValueError):
        raise CorruptEntryError(path, "header tensor entries are malformed") from None
    if 8 + n + end != file_size:
        raise CorruptEntryError(path, f"file is {file_size} bytes but its header describes {8 + n + end}")
    return summary, meta


def meta_digest(meta: Mapping[str, str]) -> str:
    """sha256 of the caller metadata's canonical JSON (the `meta_sha256` field)."""
    return hashlib.sha256(json.dumps(dict(meta), sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode()).hexdigest()


def _caller_meta(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k not in RESERVED_META}


def _check_meta(meta: dict[str, str], path: Path, expect_id: str) -> IdentityKey:
    found = meta.get("pidrt_schema")
    if found == "1":
        raise CorruptEntryError(path, "schema version '1' (written by an older pidrt, whose entries do not verify "
                                      "their metadata); enrolling the identity again rebuilds it")
    if found != SCHEMA_VERSION:
        raise CorruptEntryError(path, f"schema version {found!r}, this pidrt reads {SCHEMA_VERSION!r}")
    if meta.get("id") != expect_id:
        raise CorruptEntryError(path, f"metadata id {meta.get('id')!r} does not match the file name")
    try:
        key = IdentityKey.from_dict(json.loads(meta.get("key", "")))
    except (ValueError, TypeError, PidrtError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptEntryError(path, f"key metadata is invalid ({exc})") from None
    if key.id != expect_id or meta.get("method") != key.method:
        raise CorruptEntryError(path, "key metadata does not hash to the entry's id")
    if not SHA256_RE.match(meta.get("payload_sha256", "")):
        raise CorruptEntryError(path, "payload_sha256 metadata is missing or malformed")
    # Caller metadata drives generation (the folded query source, token count, EAA steps and
    # caption): an edited value must not load, so it is checked like the tensors are.
    if meta.get("meta_sha256") != meta_digest(_caller_meta(meta)):
        raise CorruptEntryError(path, "meta_sha256 mismatch (metadata changed)")
    return key


class IdentityStore:
    """Directory of verified, atomically written identity entries; safe across processes."""

    TEMP_MAX_AGE_S = 3600.0  # temp files older than this belong to a writer that died

    def __init__(self, root: Path | str, create: bool = True):
        """`create`: make the folder when it is missing (writers: enroll, serve); readers pass False
        so that a mistyped path is an error instead of a new empty store."""
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise PidrtError(f"identity store {self.root} is a file, not a folder")
        if not self.root.is_dir():
            if not create:
                raise PidrtError(f"no identity store at {self.root} (enrolling an identity creates one)")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PidrtError(f"cannot create the identity store folder {self.root}: {exc.strerror or exc}") from None
        self.sweep_temp()

    def path(self, id: str) -> Path:
        # Validating the id also keeps arbitrary strings from naming paths outside the root.
        if not isinstance(id, str) or not ID_RE.match(id):
            raise UnknownIdentityError(f"unknown identity {id!r} (ids look like 'sca-<16 hex digits>')")
        return self.root / f"{id}{SUFFIX}"

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and bool(ID_RE.match(id)) and self.path(id).is_file()

    def sweep_temp(self, older_than_s: float | None = None) -> int:
        """Remove temp files left by crashed writers; young ones may be a live writer's."""
        limit = time.time() - (self.TEMP_MAX_AGE_S if older_than_s is None else older_than_s)
        removed = 0
        for p in self.root.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed

    def put(
        self, key: IdentityKey, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None
    ) -> str:
        """Write the entry atomically and return its id; an existing entry for ``key`` is replaced."""
        return self._put(key, tensors, meta)[0]

    def _put(self, key, tensors, meta) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
        meta = dict(meta or {})
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise PidrtError(f"identity metadata must map str -> str (entries {bad!r})")
        clash = sorted(set(meta) & set(RESERVED_META))
        if clash:
            raise PidrtError(f"identity metadata names {clash} are reserved by the store")
        cpu = _to_cpu(tensors)
        header = {
            "pidrt_schema": SCHEMA_VERSION,
            "id": key.id,
            "method": key.method,
            "key": key.canonical_json(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "payload_sha256": fingerprint_tensors(cpu),
            "meta_sha256": meta_digest(meta),
            **meta,
        }
        atomic_write(self.path(key.id), st_save(cpu, metadata=header))
        return key.id, cpu, meta

    def _read_verified(self, id: str) -> tuple[EntryInfo, dict[str, torch.Tensor]]:
        """The entry's row and tensors, from one read of the file, fully verified."""
        path = self.path(id)
        try:
            data = path.read_bytes()  # one read: a concurrent replace cannot mix two versions
        except FileNotFoundError:
            raise UnknownIdentityError(f"unknown identity {id!r}") from None
        summary, meta = _parse_header(data, path, len(data))
        key = _check_meta(meta, path, id)
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError and others
            raise CorruptEntryError(path, f"tensor data unreadable ({exc})") from None
        if fingerprint_tensors(tensors) != meta["payload_sha256"]:
            raise CorruptEntryError(path, "payload sha256 mismatch (tensor bytes changed)")
        info = EntryInfo(id, key.method, meta.get("created", ""), len(data), key, _caller_meta(meta), summary)
        return info, tensors

    def _read(self, id: str) -> tuple[IdentityKey, dict[str, torch.Tensor], dict[str, str]]:
        info, tensors = self._read_verified(id)
        return info.key, tensors, info.meta

    def get(self, id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Verified (tensors on CPU, caller metadata); CorruptEntryError if verification fails."""
        _, tensors, meta = self._read(id)
        return tensors, meta

    def get_or_create(
        self,
        key: IdentityKey,
        build: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, str] | None]],
    ) -> tuple[str, dict[str, torch.Tensor], dict[str, str], bool]:
        """Return (id, tensors, meta, created); builds and stores on a miss or a corrupt entry."""
        try:
            stored_key, tensors, meta = self._read(key.id)
        except UnknownIdentityError:
            pass
        except CorruptEntryError as exc:
            log.warning("identity entry %s is corrupt (%s); rebuilding it", exc.path, exc.reason)
        else:
            if stored_key != key:  # 64-bit id prefix collision: never hand back another face
                raise PidrtError(f"identity id {key.id} collides with a different stored key")
            return key.id, tensors, meta, False
        tensors, meta = build()
        id, cpu, meta = self._put(key, tensors, meta)
        return id, cpu, meta, True

    def _info(self, path: Path) -> EntryInfo:
        id = path.name[: -len(SUFFIX)]
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:  # header only: listing must not read every payload
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                head += f.read(min(n, _MAX_HEADER))
        except FileNotFoundError:
            raise UnknownIdentityError(f"unknown identity {id!r}") from None
        tensors, meta = _parse_header(head, path, size)
        key = _check_meta(meta, path, id)
        return EntryInfo(id, key.method, meta.get("created", ""), size, key, _caller_meta(meta), tensors)

    def list(self) -> list[EntryInfo]:
        """Entries sorted by id, from headers only (metadata verified, payloads not hashed); corrupt
        entries are skipped with a warning."""
        out = []
        for p in sorted(self.root.glob(f"*{SUFFIX}")):
            if not ID_RE.match(p.name[: -len(SUFFIX)]):
                continue
            try:
                out.append(self._info(p))
            except CorruptEntryError as exc:
                log.warning("skipping corrupt identity entry %s (%s)", exc.path, exc.reason)
            except UnknownIdentityError:
                pass  # deleted while listing
        return out

    def show(self, id: str) -> EntryInfo:
        """Like one ``list`` row, after fully verifying the entry (CorruptEntryError if not)."""
        return self._read_verified(id)[0]

    def info(self, id: str) -> EntryInfo:
        """One ``list`` row from the header only: for an entry whose payload was just verified."""
        return self._info(self.path(id))

    def delete(self, id: str) -> None:
        """Remove an entry; UnknownIdentityError if there is none."""
        path = self.path(id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise UnknownIdentityError(f"unknown identity {id!r}") from None
        fsync_dir(self.root)

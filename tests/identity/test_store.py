"""IdentityStore: keys, round trip, corruption detection, atomic concurrent writes."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import shutil

import pytest
import torch

from pidrt.errors import FormatError, PidrtError
from pidrt.identity.store import (
    CorruptEntryError,
    IdentityKey,
    IdentityStore,
    UnknownIdentityError,
    fingerprint_module,
    fingerprint_tensors,
)

BASE = "b" * 64
ADAPTER = "a" * 64


def make_key(**overrides) -> IdentityKey:
    args = dict(images=[b"face-1", b"face-2"], method="eaa", base_fingerprint=BASE, adapter_fingerprint=ADAPTER)
    params = dict(scheduler="ddim", steps=50, resolution=512, caption="a photo of sks person")
    args.update({k: v for k, v in overrides.items() if k in args})
    params.update({k: v for k, v in overrides.items() if k not in args})
    return IdentityKey.make(**args, **params)


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a_fp32": torch.randn(4, 8, generator=g),
        "b_fp16": torch.randn(3, 5, generator=g).half(),
        "c_bf16": torch.randn(2, 7, generator=g).bfloat16(),
        "d_scalar": torch.tensor(3.5),
        "e_int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


@pytest.fixture
def store(tmp_path):
    return IdentityStore(tmp_path / "ids")


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- keys


def test_key_id_format_and_determinism():
    k1, k2 = make_key(), make_key()
    assert k1 == k2 and k1.id == k2.id and k1.digest == k2.digest
    assert k1.id.startswith("eaa-") and len(k1.id) == 4 + 16
    assert k1.digest == hashlib.sha256(k1.canonical_json().encode()).hexdigest()
    assert k1.images[0] == hashlib.sha256(b"face-1").hexdigest()
    # kwargs order does not matter; params are stored sorted
    k3 = IdentityKey.make([b"face-1", b"face-2"], "eaa", BASE, ADAPTER, caption="a photo of sks person",
                          resolution=512, steps=50, scheduler="ddim")
    assert k3.id == k1.id
    assert [p[0] for p in k1.params] == sorted(p[0] for p in k1.params)
    assert IdentityKey.from_dict(json.loads(k1.canonical_json())) == k1


@pytest.mark.parametrize(
    "change",
    [
        dict(images=[b"face-1", b"face-3"]),
        dict(images=[b"face-2", b"face-1"]),  # order is significant
        dict(images=[b"face-1"]),
        dict(method="sca"),
        dict(method="ip"),
        dict(base_fingerprint="c" * 64),
        dict(adapter_fingerprint="d" * 64),
        dict(scheduler="euler"),
        dict(steps=51),
        dict(resolution=768),
        dict(caption="a photo of zwx person"),
        dict(extra_param="x"),
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values())))[:20],
)
def test_key_changes_with_every_field(change):
    assert make_key(**change).id != make_key().id


def test_key_rejects_bad_input():
    with pytest.raises(PidrtError, match="method"):
        make_key(method="lora")
    with pytest.raises(PidrtError, match="bytes"):
        IdentityKey.make(["face.png"], "sca", BASE, ADAPTER)
    with pytest.raises(PidrtError, match="image"):
        IdentityKey.make([], "sca", BASE, ADAPTER)
    with pytest.raises(PidrtError):
        IdentityKey(("nothex",), "sca", BASE, ADAPTER)


# ---------------------------------------------------------------- fingerprints


def test_fingerprints():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    fp = fingerprint_module(m)
    assert fp == fingerprint_module(m) == fingerprint_tensors(m.state_dict())
    assert fp != fingerprint_module(m.to(torch.bfloat16))  # dtype is hashed; bf16 supported
    sd = {"w": torch.arange(6.0)}
    base = fingerprint_tensors(sd)
    assert base != fingerprint_tensors({"w": torch.arange(6.0).reshape(2, 3)})  # shape
    assert base != fingerprint_tensors({"v": torch.arange(6.0)})  # name
    changed = torch.arange(6.0)
    changed[3] += 1e-6
    assert base != fingerprint_tensors({"w": changed})  # bytes
    # non-contiguous input hashes like its contiguous copy
    t = torch.randn(4, 5)
    assert fingerprint_tensors({"t": t.T}) == fingerprint_tensors({"t": t.T.contiguous()})


# ---------------------------------------------------------------- round trip


def test_round_trip(store):
    key, tensors = make_key(), make_tensors()
    meta = {"encoder": "clip-vit-l", "note": "ünïcode ok"}
    id_ = store.put(key, tensors, meta)
    assert id_ == key.id
    assert (store.root / f"{id_}.safetensors").is_file()
    got, got_meta = store.get(id_)
    assert_same(got, tensors)
    assert got_meta == meta
    assert id_ in store and "sca-0000000000000000" not in store


def test_put_accepts_noncontiguous_and_tied_tensors(store):
    w = torch.randn(6, 4)
    tensors = {"t": w.T, "tied_a": w, "tied_b": w}
    id_ = store.put(make_key(), tensors)
    got, meta = store.get(id_)
    assert meta == {}
    assert_same(got, {k: v.contiguous() for k, v in tensors.items()})


def test_metadata_validation(store):
    with pytest.raises(PidrtError, match="reserved"):
        store.put(make_key(), make_tensors(), {"id": "x"})
    with pytest.raises(PidrtError, match="str"):
        store.put(make_key(), make_tensors(), {"n": 3})


def test_unknown_identity(store):
    for bad in ["sca-0123456789abcdef", "../../etc/passwd", "nope"]:
        with pytest.raises(UnknownIdentityError, match="unknown identity"):
            store.get(bad)
    with pytest.raises(KeyError):
        store.get("ip-0123456789abcdef")


# ---------------------------------------------------------------- corruption


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the tensor data sits after the header, at the end of the file
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _truncate_to_stub(path):
    path.write_bytes(path.read_bytes()[:5])


def _garble_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"#garbage#garbage"
    path.write_bytes(bytes(data))


def _huge_header_len(path):
    data = bytearray(path.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _rewrite_header(path, edit):
    """Apply ``edit`` to the parsed safetensors header and write it back with the same payload."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _wrong_id_in_meta(path):
    _rewrite_header(path, lambda h: h["__metadata__"].update(id="eaa-0000000000000000"))


def _wrong_schema(path):
    _rewrite_header(path, lambda h: h["__metadata__"].update(pidrt_schema="99"))


def _tampered_key(path):
    def edit(h):
        key = json.loads(h["__metadata__"]["key"])
        key["params"] = [[k, "49" if k == "steps" else v] for k, v in key["params"]]
        h["__metadata__"]["key"] = json.dumps(key)

    _rewrite_header(path, edit)


def _no_payload_hash(path):
    _rewrite_header(path, lambda h: h["__metadata__"].pop("payload_sha256"))


def _bad_tensor_entry(path):
    _rewrite_header(path, lambda h: h["a_fp32"].update(shape=5))


def _edited_caller_meta(path):
    # What a generation reads from the metadata (the few-token query source, EAA steps, ...).
    _rewrite_header(path, lambda h: h["__metadata__"].update(query="z"))


def _no_meta_hash(path):
    _rewrite_header(path, lambda h: h["__metadata__"].pop("meta_sha256"))


def _schema_1_entry(path):
    """An entry as pidrt wrote it before metadata was checked: schema 1, no meta_sha256."""
    def edit(h):
        h["__metadata__"].pop("meta_sha256")
        h["__metadata__"]["pidrt_schema"] = "1"

    _rewrite_header(path, edit)


CORRUPTIONS = {
    "flip_payload_byte": (_flip_payload_byte, "payload sha256"),
    "truncate": (_truncate, "bytes"),
    "truncate_to_stub": (_truncate_to_stub, "shorter"),
    "garble_header": (_garble_header, "JSON"),
    "huge_header_len": (_huge_header_len, "header length"),
    "wrong_id_in_meta": (_wrong_id_in_meta, "does not match the file name"),
    "wrong_schema": (_wrong_schema, "schema version"),
    "tampered_key": (_tampered_key, "does not hash"),
    "no_payload_hash": (_no_payload_hash, "payload_sha256"),
    "bad_tensor_entry": (_bad_tensor_entry, "malformed"),
    "edited_caller_meta": (_edited_caller_meta, "meta_sha256 mismatch"),
    "no_meta_hash": (_no_meta_hash, "meta_sha256"),
    "schema_1_entry": (_schema_1_entry, "older pidrt"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_detected(store, name):
    corrupt, reason = CORRUPTIONS[name]
    id_ = store.put(make_key(), make_tensors())
    path = store.path(id_)
    corrupt(path)
    with pytest.raises(CorruptEntryError, match=reason) as exc:
        store.get(id_)
    assert isinstance(exc.value, FormatError)
    assert exc.value.path == path and str(path) in str(exc.value)
    with pytest.raises(CorruptEntryError):
        store.show(id_)


def test_file_renamed_to_another_id_is_corrupt(store):
    id_ = store.put(make_key(), make_tensors())
    other = make_key(steps=7).id
    shutil.copy(store.path(id_), store.path(other))
    with pytest.raises(CorruptEntryError, match="does not match the file name"):
        store.get(other)


@pytest.mark.parametrize("name", ["flip_payload_byte", "truncate", "garble_header", "wrong_id_in_meta",
                                  "edited_caller_meta", "schema_1_entry"])
def test_get_or_create_rebuilds_corrupt_entry(store, name, caplog):
    key, tensors = make_key(), make_tensors()
    store.put(key, tensors, {"v": "1"})
    CORRUPTIONS[name][0](store.path(key.id))
    calls = []

    def build():
        calls.append(1)
        return make_tensors(), {"v": "2"}

    with caplog.at_level(logging.WARNING, logger="pidrt.identity.store"):
        id_, got, meta, created = store.get_or_create(key, build)
    assert calls == [1] and created and id_ == key.id and meta == {"v": "2"}
    assert_same(got, tensors)
    assert any(str(store.path(key.id)) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    again, again_meta = store.get(id_)  # the file is valid afterwards
    assert_same(again, tensors)
    assert again_meta == {"v": "2"}


def test_edited_metadata_is_never_returned(store, caplog):
    """Every metadata value a generation reads is verified: list, show and get refuse an edited one."""
    key = make_key()
    store.put(key, make_tensors(), {"query": "x", "n_tokens": "4"})
    path = store.path(key.id)
    _rewrite_header(path, lambda h: h["__metadata__"].update(query="z"))
    for read in (store.get, store.show):
        with pytest.raises(CorruptEntryError, match="metadata changed"):
            read(key.id)
    with caplog.at_level(logging.WARNING, logger="pidrt.identity.store"):
        assert store.list() == []
    assert any(key.id in r.getMessage() for r in caplog.records)


def test_store_folder_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root in (a_file, a_file / "below"):
        with pytest.raises(PidrtError, match="is a file|cannot create"):
            IdentityStore(root)
    with pytest.raises(PidrtError, match="no identity store"):
        IdentityStore(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()  # only writers create stores


def test_unknown_identity_message_names_no_path(store):
    with pytest.raises(UnknownIdentityError) as exc:
        store.get("ip-0123456789abcdef")
    assert str(store.root) not in str(exc.value) and "ip-0123456789abcdef" in str(exc.value)


def test_get_or_create_hit_and_miss(store):
    key = make_key()
    calls = []

    def build():
        calls.append(1)
        return make_tensors(), {"src": "build"}

    first = store.get_or_create(key, build)
    second = store.get_or_create(key, build)
    assert calls == [1]
    assert first[3] is True and second[3] is False
    assert first[0] == second[0] == key.id and second[2] == {"src": "build"}
    assert_same(first[1], second[1])


# ---------------------------------------------------------------- list / show / delete


def test_list_show_delete(store, caplog):
    k1, k2 = make_key(), make_key(method="sca")
    store.put(k1, make_tensors(), {"who": "alice"})
    store.put(k2, {"x": torch.zeros(2, 3, dtype=torch.float16)})
    (store.root / "README.txt").write_text("not an entry")
    rows = store.list()
    assert [r.id for r in rows] == sorted([k1.id, k2.id])
    by_id = {r.id: r for r in rows}
    r1 = by_id[k1.id]
    assert r1.method == "eaa" and r1.key == k1 and r1.meta == {"who": "alice"}
    assert r1.size == store.path(k1.id).stat().st_size and r1.created.startswith("20")
    info = store.show(k2.id)
    assert info.tensors == {"x": ("F16", (2, 3))} and info.key == k2
    assert store.show(k1.id).tensors["c_bf16"] == ("BF16", (2, 7))

    _garble_header(store.path(k2.id))
    with caplog.at_level(logging.WARNING, logger="pidrt.identity.store"):
        assert [r.id for r in store.list()] == [k1.id]
    assert any(k2.id in r.getMessage() for r in caplog.records)

    store.delete(k1.id)
    assert k1.id not in store
    with pytest.raises(UnknownIdentityError):
        store.delete(k1.id)
    with pytest.raises(UnknownIdentityError):
        store.show(k1.id)


def test_failed_write_leaves_no_temp_file(store, monkeypatch):
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(make_key(), make_tensors())
    assert list(store.root.iterdir()) == []


def test_sweep_removes_only_stale_temp_files(store):
    import os

    stale, fresh = store.root / ".x.safetensors.1.a.tmp", store.root / ".y.safetensors.1.b.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    assert store.sweep_temp() == 1
    assert not stale.exists() and fresh.exists()


# ---------------------------------------------------------------- concurrency


def _big_tensors() -> dict[str, torch.Tensor]:
    # Deterministic and a few MB, so the writes take long enough to overlap.
    return {f"t{i}": torch.arange(128 * 1024, dtype=torch.float32) * (i + 1) for i in range(4)}


def _writer(root: str, barrier, rounds: int) -> None:
    store = IdentityStore(root)
    key = make_key()
    tensors = _big_tensors()
    barrier.wait()
    for _ in range(rounds):
        store.put(key, tensors, {"writer": "any"})


def test_concurrent_writers_same_key(tmp_path):
    root = tmp_path / "ids"
    IdentityStore(root)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(5)
    procs = [ctx.Process(target=_writer, args=(str(root), barrier, 5)) for _ in range(4)]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    # While they write, every read must see either no entry or a whole, valid one.
    store, key, seen = IdentityStore(root), make_key(), 0
    while any(p.is_alive() for p in procs):
        try:
            tensors, _ = store.get(key.id)
            seen += 1
        except UnknownIdentityError:
            continue
        assert_same(tensors, _big_tensors())
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [p.name for p in root.iterdir()] == [f"{key.id}.safetensors"]  # no temp files left
    tensors, meta = store.get(key.id)
    assert_same(tensors, _big_tensors())
    assert meta == {"writer": "any"}

"""The engine cache: a second start reuses an entry, a corrupt or mismatched one is rebuilt, never used.

The build functions here write small files; `tests/engines/test_choose.py` runs the same cache
with real exports.
"""

from __future__ import annotations

import json
import logging

import pytest

from pidrt.engines.engine_cache import ENTRY, CorruptEngineEntry, EngineCache

RECORD = {"backend": "ort", "kind": "unet", "method": "sca", "dtype": "float32", "base_weights": "ab" * 32,
          "versions": {"torch": "2.13.0"}}


class Builder:
    def __init__(self, payload: bytes = b"graph bytes"):
        self.calls, self.payload = 0, payload

    def __call__(self, folder):
        self.calls += 1
        (folder / "graph.onnx").write_bytes(self.payload)
        (folder / "engines").mkdir()
        (folder / "engines" / "plan.bin").write_bytes(b"plan")


def test_second_open_is_a_hit_without_building(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    path, status = cache.get_or_build("ort-unet", RECORD, build)
    assert status == "built" and build.calls == 1
    entry = json.loads((path / ENTRY).read_text())
    assert entry["record"] == RECORD and set(entry["files"]) == {"graph.onnx", "engines/plan.bin"}
    mtime = (path / "graph.onnx").stat().st_mtime_ns
    again, status = EngineCache(tmp_path).get_or_build("ort-unet", RECORD, build)
    assert (again, status, build.calls) == (path, "hit", 1)
    assert (path / "graph.onnx").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind


def test_a_changed_input_is_another_entry(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    a, _ = cache.get_or_build("ort-unet", RECORD, build)
    b, status = cache.get_or_build("ort-unet", {**RECORD, "versions": {"torch": "2.14.0"}}, build)
    assert a != b and status == "built" and build.calls == 2


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file", "drop entry.json", "edit the record"])
def test_a_corrupt_entry_is_reported_and_rebuilt(tmp_path, caplog, damage):
    cache, build = EngineCache(tmp_path), Builder()
    path, _ = cache.get_or_build("ort-unet", RECORD, build)
    graph = path / "graph.onnx"
    if damage == "flip a byte":
        data = bytearray(graph.read_bytes())
        data[0] ^= 1
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(graph.read_bytes()[:-1])
    elif damage == "delete a file":
        (path / "engines" / "plan.bin").unlink()
    elif damage == "drop entry.json":
        (path / ENTRY).unlink()
    else:
        entry = json.loads((path / ENTRY).read_text())
        entry["record"]["dtype"] = "float16"
        (path / ENTRY).write_text(json.dumps(entry))
    with pytest.raises(CorruptEngineEntry):
        cache.verify(path, RECORD)
    with caplog.at_level(logging.WARNING):
        again, status = cache.get_or_build("ort-unet", RECORD, build)
    assert (again, status, build.calls) == (path, "rebuilt", 2)
    assert any("corrupt engine cache entry" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    cache.verify(path, RECORD)
    assert graph.read_bytes() == b"graph bytes"


def test_a_failed_build_leaves_nothing(tmp_path):
    cache = EngineCache(tmp_path)

    def broken(folder):
        (folder / "half.onnx").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build("ort-unet", RECORD, broken)
    assert list(tmp_path.iterdir()) == []


def test_a_race_uses_the_entry_another_process_finished(tmp_path):
    cache = EngineCache(tmp_path)
    final = cache.path("ort-unet", RECORD)

    def slow_loser(folder):  # another process completes the same entry while this one builds
        Builder()(folder)
        EngineCache(tmp_path).get_or_build("ort-unet", RECORD, Builder())

    path, status = cache.get_or_build("ort-unet", RECORD, slow_loser)
    assert (path, status) == (final, "hit")
    cache.verify(final, RECORD)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_unwritable_cache_fails_at_start(tmp_path):
    from pidrt.engines.engine_cache import check_writable
    from pidrt.errors import PidrtError

    # A cache folder under a regular file cannot be made by anyone (root ignores permission bits).
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(PidrtError, match="not writable"):
        check_writable(blocker / "cache")

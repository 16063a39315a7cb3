"""Backend options and shape buckets: parsing, defaults, what a request outside them gets."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import pytest

from pidrt.engines.options import (
    BackendOptions,
    Bucket,
    Buckets,
    OffBucketLog,
    add_backend_arguments,
    backend_options_from_args,
)
from pidrt.errors import PidrtError
from pidrt.runtime.requests import InvalidRequest


def test_buckets_parse_and_print():
    b = Buckets.parse(["1,2,4,8@512x512", "1,2@768x640"])
    assert b.sizes == [(512, 512), (768, 640)]
    assert b.batches(512, 512) == [1, 2, 4, 8] and b.batches(768, 640) == [1, 2]
    assert str(b) == "1,2,4,8@512x512 1,2@768x640"
    assert Buckets.parse(str(b)) == b
    for bad in ("1,2", "a@512x512", "1@512", "0@64x64"):
        with pytest.raises(PidrtError):
            Buckets.parse(bad)


def test_default_buckets_are_powers_of_two_up_to_max_batch():
    assert str(Buckets.default(512, 8)) == "1,2,4,8@512x512"
    assert str(Buckets.default(64, 6)) == "1,2,4,6@64x64"


def test_a_request_outside_the_buckets_is_refused_naming_them():
    b = Buckets.parse("1,2@64x64")
    b.check(64, 64, 2)
    with pytest.raises(InvalidRequest, match=r"size 128x64 is not served here; this server's buckets are 1,2@64x64"):
        b.check(128, 64, 1)
    with pytest.raises(InvalidRequest, match=r"n=3 images at 64x64 exceed the largest bucket \(2\)"):
        b.check(64, 64, 3)


def test_backend_options_validate():
    with pytest.raises(PidrtError, match="unknown backend 'fast_torch'"):
        BackendOptions(backend="fast_torch")
    with pytest.raises(PidrtError, match="--engines is an export folder for the ort or trt backend"):
        BackendOptions(backend="torch", engines="x")
    assert BackendOptions(methods=("sca",)).methods == ("none", "sca")


def test_cli_arguments_round_trip(tmp_path):
    p = argparse.ArgumentParser()
    add_backend_arguments(p)
    a = p.parse_args(["--backend", "ort", "--engines", str(tmp_path), "--buckets", "1,2@64x64", "--methods", "ip",
                      "--threads", "1"])
    o = backend_options_from_args(a)
    assert (o.backend, o.engines, str(o.buckets), o.methods, o.threads) == ("ort", tmp_path, "1,2@64x64",
                                                                            ("none", "ip"), 1)
    assert backend_options_from_args(p.parse_args([])) == BackendOptions()


def test_a_batch_between_buckets_is_logged_once(caplog):
    watch = OffBucketLog(Buckets.parse("1,4@64x64"), "ort")
    job = SimpleNamespace(request=SimpleNamespace(width=64, height=64))
    with caplog.at_level(logging.WARNING):
        for images in (1, 3, 3, 4):
            watch.on_batch(SimpleNamespace(images=images), [job])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "3@64x64 is not a declared bucket" in warnings[0]
    assert watch.seen == {Bucket(64, 64, 3)}

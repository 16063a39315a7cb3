"""pidrt.runtime.generator on the tiny preset: requests, batching, cancellation, progress, errors.

Identities are IP-Adapter ones (random adapter, Haar face detector on a real photo): enrolling
takes about a second, once per module.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from pidrt.identity.enroll import Encoders, Enroller
from pidrt.identity.image_encoder import ClipImageEncoder
from pidrt.identity.store import IdentityStore, UnknownIdentityError
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights
from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import (Cancelled, Defaults, GenerationFailed, GenerationRequest, GenerationTimeout,
                                    GeneratorClosed, GeneratorConfig, InvalidRequest, Overloaded)

STEPS = 2


@pytest.fixture(scope="module")
def enroller(tiny_pipe, tmp_path_factory):
    L = tiny_pipe.layers
    enc = Encoders(ip=IPAdapterWeights.random(L, 32, embeddings_dim=64), image_encoder=ClipImageEncoder.random(64),
                   eaa=EAAAdapter.random(L, 8, 4, 16))
    return Enroller(tiny_pipe, IdentityStore(tmp_path_factory.mktemp("store")), enc)


def config(**kw) -> GeneratorConfig:
    kw.setdefault("defaults", Defaults(steps=STEPS, guidance=5.0))
    kw.setdefault("enroll_detector", "haar")
    return GeneratorConfig(**kw)


@pytest.fixture(scope="module")
def identities(tiny_pipe, enroller, photos):
    a, b = photos
    with Generator(tiny_pipe, enroller, config()) as gen:
        return [gen.enroll([img], "ip").identity_id for img in (a, b)]


@pytest.fixture
def make_gen(tiny_pipe, enroller):
    made = []

    def make(**kw):
        made.append(Generator(tiny_pipe, enroller, config(**kw)))
        return made[-1]

    yield make
    for g in made:
        g.close()


def pixels(result):
    return torch.stack([img.pixels for img in result.images])


def test_resolve_fills_defaults_and_refuses_bad_requests(make_gen):
    gen = make_gen()
    r = gen.resolve(GenerationRequest("a photo", seed=5, n=3))
    assert (r.steps, r.guidance, r.width, r.height, r.seeds, r.output_format) == (STEPS, 5.0, 64, 64, (5, 6, 7), "png")
    assert gen.resolve(GenerationRequest("p", seed=[9, 4])).n == 2
    random_seeds = gen.resolve(GenerationRequest("p", n=2)).seeds
    assert len(random_seeds) == 2 and all(0 <= s < 2**32 for s in random_seeds)
    for bad, words in [
        (dict(steps=0), "steps"), (dict(steps=10_000), "steps"), (dict(n=100), "n must"), (dict(width=60), "width"),
        (dict(height=68), "multiple of 8"), (dict(seed=[1, 2], n=3), "one seed per image"), (dict(seed=-1), "seed"),
        (dict(output_format="gif"), "output_format"), (dict(guidance=float("nan")), "guidance"),
        (dict(scheduler="euler"), "scheduler"), (dict(scale=-1), "scale"), (dict(scale_start=5), "scale_start"),
        (dict(method="sca", identity="ip-0123456789abcdef"), "enrolled with ip"), (dict(steps="4"), "integer"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            gen.resolve(GenerationRequest("p", **bad))
    with pytest.raises(UnknownIdentityError):
        gen.submit(GenerationRequest("p", identity="ip-0123456789abcdef"))
    with pytest.raises(UnknownIdentityError):
        gen.submit(GenerationRequest("p", identity="../../etc/passwd"))


def test_mixed_identity_batch_equals_single_requests(make_gen, identities, hold_worker):
    gen = make_gen(max_batch=8)
    a, b = identities
    reqs = [GenerationRequest("a portrait", identity=a, seed=11, scale=0.8),
            GenerationRequest("a dog", seed=[3, 4]),
            GenerationRequest("a portrait", identity=b, seed=12, scale_start=1, method="ip")]
    with hold_worker(gen) as busy:
        jobs = [gen.submit(r) for r in reqs]
    results = [j.result(timeout=60) for j in jobs]
    assert busy.result().batch.id < results[0].batch.id
    assert len({r.batch.id for r in results}) == 1 and results[0].batch.images == 4
    assert results[0].batch.requests == 3 and results[0].batch.method == "ip"
    assert [img.identity for r in results for img in r.images] == [a, None, None, b]
    assert results[1].images[1].seed == 4 and results[0].images[0].backend == "torch"
    for req, batched in zip(reqs, results):
        alone = gen.generate(req, timeout=60)
        assert alone.batch.requests == 1
        assert (pixels(alone) - pixels(batched)).abs().max() < 1e-4
    assert (pixels(results[0]) - pixels(results[2])).abs().max() > 1e-3  # identities do differ
    stats = gen.stats()
    assert stats["text_cache"]["hits"] > 0 and stats["identity_cache"]["entries"] == 2


def test_incompatible_requests_do_not_share_a_batch(make_gen, hold_worker):
    gen = make_gen(max_batch=8)
    with hold_worker(gen):
        jobs = [gen.submit(GenerationRequest("p", seed=1)), gen.submit(GenerationRequest("p", seed=1, width=128)),
                gen.submit(GenerationRequest("p", seed=1, guidance=3.0)), gen.submit(GenerationRequest("p", seed=2))]
    batches = [j.result(timeout=60).batch.id for j in jobs]
    assert batches[0] == batches[3] and len({batches[0], batches[1], batches[2]}) == 3
    assert jobs[1].result().images[0].pixels.shape == (3, 64, 128)


def test_progress_events_in_order_sync_and_async(make_gen):
    gen = make_gen()
    job = gen.submit(GenerationRequest("p", seed=1, steps=3))
    kinds = [(e.type, e.step) for e in job.iter_events()]
    assert kinds == [("queued", None), ("started", None), ("step", 1), ("step", 2), ("step", 3), ("done", None)]
    assert [e.seq for e in job.events] == list(range(6))

    async def run():
        seen = []
        result = await gen.agenerate(GenerationRequest("p", seed=2, steps=3), on_event=seen.append)
        job = gen.submit(GenerationRequest("p", seed=2, steps=3))
        streamed = [e.type async for e in job.stream()]
        return result, seen, streamed, await job.wait()

    result, seen, streamed, again = asyncio.run(run())
    assert [e.type for e in seen] == ["queued", "started", "step", "step", "step", "done"]
    assert streamed == ["queued", "started", "step", "step", "step", "done"]
    assert result.images[0].data == again.images[0].data  # same seed, same PNG


def test_cancelling_one_request_does_not_disturb_its_batch(make_gen, identities, hold_worker):
    gen = make_gen(max_batch=4)
    keep = GenerationRequest("a portrait", identity=identities[0], seed=21, steps=3)

    def cancel_after_first_step(e):
        if e.type == "step" and e.step == 1:
            threading.Thread(target=victim.cancel).start()  # from another thread, as a caller would

    with hold_worker(gen):
        victim = gen.submit(GenerationRequest("p", seed=22, steps=3), on_event=cancel_after_first_step)
        kept = gen.submit(keep)
    with pytest.raises(Cancelled):
        victim.result(timeout=60)
    result = kept.result(timeout=60)
    assert result.batch.requests == 2 and victim.state == "cancelled" and victim.events[-1].type == "cancelled"
    assert (pixels(result) - pixels(gen.generate(keep, timeout=60))).abs().max() < 1e-4


def test_cancel_queued_and_lone_running_jobs(make_gen):
    gen = make_gen(max_batch=1, max_wait_ms=0)
    steps = 40
    first = gen.submit(GenerationRequest("p", seed=1, steps=steps))
    queued = gen.submit(GenerationRequest("p", seed=2, steps=steps))
    assert queued.cancel() and not queued.cancel()
    assert [e.type for e in queued.events] == ["queued", "cancelled"]
    for ev in first.iter_events():
        if ev.type == "step":
            first.cancel()
    with pytest.raises(Cancelled):
        first.result()
    deadline = time.monotonic() + 30  # the batch stops between steps: the worker is free long before 40 steps
    while gen.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gen.generate(GenerationRequest("p", seed=3), timeout=60).images  # the worker goes on
    assert max(e.step or 0 for e in first.events) < steps


def test_async_cancellation_cancels_the_job(make_gen):
    gen = make_gen()

    async def run():
        task = asyncio.ensure_future(gen.agenerate(GenerationRequest("p", seed=1, steps=40)))
        while not gen.stats()["running"]:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert gen.stats()["outcomes"].get("cancelled") == 1


def test_full_queue_overloaded_and_timeout(make_gen, hold_worker):
    gen = make_gen(max_batch=1, max_wait_ms=0, queue_size=1)
    with hold_worker(gen):  # the worker is busy until the waiting request has timed out
        waiting = gen.submit(GenerationRequest("p", seed=2, timeout_s=0.2))
        with pytest.raises(Overloaded) as err:
            gen.submit(GenerationRequest("p", seed=3))
        assert err.value.retry_after >= 1
        with pytest.raises(GenerationTimeout):
            waiting.result()
    assert waiting.events[-1].data["type"] == "timeout"


def test_worker_survives_a_failing_batch_and_isolates_the_culprit(tiny_pipe, enroller, hold_worker):
    class Flaky:
        """Delegates to the tiny pipeline; batches holding a POISON prompt fail."""

        models = tiny_pipe.models

        def encode_text(self, prompts):
            return tiny_pipe.encode_text(prompts)

        def generate(self, cfg, specs, on_step=None, encode=None):
            if any("POISON" in s.prompt for s in specs):
                raise RuntimeError("device fell over")
            return tiny_pipe.generate(cfg, specs, on_step=on_step, encode=encode)

    with Generator(Flaky(), enroller, config(max_batch=4)) as gen:
        with hold_worker(gen):
            bad = gen.submit(GenerationRequest("POISON", seed=1))
            good = gen.submit(GenerationRequest("fine", seed=2))
        with pytest.raises(GenerationFailed, match="device fell over"):
            bad.result(timeout=60)
        assert good.result(timeout=60).images[0].seed == 2
        assert gen.generate(GenerationRequest("fine", seed=3), timeout=60).images
    with pytest.raises(GeneratorClosed):
        gen.submit(GenerationRequest("p"))


def test_close_fails_queued_requests(make_gen):
    gen = make_gen(max_batch=1, max_wait_ms=0)
    first = gen.submit(GenerationRequest("p", seed=1, steps=4))
    while first.state == "queued":
        time.sleep(0.005)
    queued = [gen.submit(GenerationRequest("p", seed=s)) for s in (2, 3)]
    gen.close()
    assert first.result().images
    for job in queued:
        with pytest.raises(GeneratorClosed):
            job.result()
    assert not gen.ready


def test_eaa_identity_needs_its_enrollment_step_count(make_gen, photos):
    gen = make_gen()
    a, _ = photos
    eaa = gen.enroll([a], "eaa", steps=STEPS).identity_id
    with pytest.raises(InvalidRequest, match=f"enrolled for {STEPS} steps"):
        gen.submit(GenerationRequest("p", identity=eaa, steps=STEPS + 1))
    with pytest.raises(InvalidRequest, match="ddim"):
        gen.submit(GenerationRequest("p", identity=eaa, scheduler="dpm++2m"))
    result = gen.generate(GenerationRequest("p", identity=eaa, seed=1), timeout=60)
    assert result.images[0].method == "eaa"
    gen.delete_identity(eaa)
    with pytest.raises(UnknownIdentityError):
        gen.submit(GenerationRequest("p", identity=eaa))


def test_eaa_identity_steps_are_the_default(make_gen, photos):
    """A request naming only an EAA identity runs the step count it was enrolled for."""
    gen = make_gen()
    eaa = gen.enroll([photos[0]], "eaa", steps=STEPS + 1).identity_id
    result = gen.generate(GenerationRequest("p", identity=eaa, seed=1), timeout=60)
    assert result.request.steps == STEPS + 1 and result.request.scale == 0.8
    assert gen.resolve(GenerationRequest("p")).steps == STEPS  # no identity: the server's default


def test_default_scale_per_method_and_adapter_metadata(tiny_pipe, enroller, make_gen):
    gen = make_gen()
    scale = {m: gen.resolve(GenerationRequest("p", identity=f"{m}-0123456789abcdef", steps=STEPS)).scale
             for m in ("sca", "ip", "eaa")}
    assert scale == {"sca": 0.4, "ip": 1.0, "eaa": 0.8}  # PIDiff, diffusers, Inv-Adapter's [0.6, 1]
    assert gen.resolve(GenerationRequest("p")).scale == 0.0  # no identity, no branch
    assert gen.resolve(GenerationRequest("p", identity="sca-0123456789abcdef", scale=0.9)).scale == 0.9
    # An adapter file's default_scale overrides the paper's; an explicit server default overrides both.
    import dataclasses

    ip = dataclasses.replace(enroller.encoders.ip, default_scale=0.6)
    tuned = Enroller(tiny_pipe, enroller.store, dataclasses.replace(enroller.encoders, ip=ip))
    with Generator(tiny_pipe, tuned, config()) as g:
        assert g.resolve(GenerationRequest("p", identity="ip-0123456789abcdef")).scale == 0.6
    fixed = make_gen(defaults=Defaults(steps=STEPS, guidance=5.0, scale=0.3))
    assert fixed.resolve(GenerationRequest("p", identity="sca-0123456789abcdef")).scale == 0.3


def test_seed_bound_allows_the_last_seed(make_gen):
    gen = make_gen()
    top = 2**63 - 1
    assert gen.resolve(GenerationRequest("p", seed=top)).seeds == (top,)
    assert gen.resolve(GenerationRequest("p", seed=top - 1, n=2)).seeds == (top - 1, top)
    with pytest.raises(InvalidRequest, match="seed"):
        gen.resolve(GenerationRequest("p", seed=top, n=2))


def test_identity_device_cache_serves_conditions(tmp_path, photos):
    """With a byte budget the artifacts live in the DeviceCache; images equal the host path."""
    from pidrt.serve.factory import build_generator

    images = []
    for mib in (0, 64):
        with build_generator(tmp_path / f"store{mib}", config=config(identity_device_mib=mib)) as gen:
            ident = gen.enroll([photos[0]], "ip").identity_id
            for _ in range(2):
                out = gen.generate(GenerationRequest("a portrait", identity=ident, seed=3, width=64, height=64))
            images.append(out.images[0].pixels)
            cache = gen.enroller.device_cache
            if mib:
                assert cache.stats()["misses"] == 1 and cache.stats()["hits"] >= 1 and ident in cache
                gen.delete_identity(ident)
                assert ident not in cache
            else:
                assert cache is None
    assert (images[0].float() - images[1].float()).abs().max() <= 1e-4

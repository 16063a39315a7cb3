"""The EAA `streamed` placement: stream ordering (a recording shim on CPU) and, on a GPU, exactness.

On CPU the order of the CUDA calls is checked through `CudaStreams`' interface: copies issued on
the side stream before its event, the consumer waiting for that event before a step's K/V are
handed out, every handed-out tensor recorded on the consumer stream (so the caching allocator
does not give its memory to a later prefetch while the consumer may still read it), and the next
prefetch only after that. On a GPU, a generation whose device lags steps behind the host (a
sleep kernel queued after every step) must give exactly the resident placement's images.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.conditions import EAACondition, ScaleSchedule
from pidrt.runtime.eaa_feed import CachedFeed
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

STEPS = 6


def random_condition(layers, steps: int, seed: int) -> EAACondition:
    g = torch.Generator().manual_seed(seed)
    return EAACondition([{layer.name: (torch.randn(5, layer.channels, generator=g),
                                       torch.randn(5, layer.channels, generator=g)) for layer in layers}
                         for _ in range(steps)])


class RecordingStreams:
    """CudaStreams' interface on CPU, logging each call in order."""

    def __init__(self):
        self.log, self.on_side_now, self.events = [], False, 0
        self.main = self

    def wait_event(self, event):  # the consumer stream's method
        self.log.append(("wait", event))

    def consumer(self):
        return self.main

    @contextlib.contextmanager
    def on_side(self):
        self.log.append(("side",))
        self.on_side_now = True
        try:
            yield
        finally:
            self.on_side_now = False
            self.log.append(("main",))

    def record_event(self):
        assert self.on_side_now, "the event must be recorded on the side stream, after its copies"
        self.events += 1
        self.log.append(("event", self.events - 1))
        return self.events - 1

    def pin(self, t):
        self.log.append(("pin",))
        return t.clone()

    def used_on(self, t, stream):
        assert stream is self.main
        self.log.append(("used_on", t.data_ptr()))


def test_streamed_feed_orders_copies_waits_and_stream_uses(tiny_pipe):
    layers = tiny_pipe.layers
    conds = [random_condition(layers, STEPS, 1), None, random_condition(layers, STEPS, 2)]
    streams = RecordingStreams()
    feed = CachedFeed(layers, conds, "cpu", torch.float32, streamed=True, streams=streams)
    n_tensors = 2 * len(layers) * 2  # K and V of every layer, two identities (None is not streamed)
    assert [e for e in streams.log if e[0] == "pin"] == [("pin",)] * n_tensors * STEPS
    streams.log.clear()
    prefetched = feed.ready[0][0]
    for i in range(STEPS):
        handed = {t.data_ptr() for step in prefetched if step for kv in step.values() for t in kv}
        payloads = feed.payloads(i)
        log, streams.log = streams.log, []
        # Wait for step i's copies, record each of its tensors on the consumer, then prefetch i+1.
        assert log[0] == ("wait", i)
        assert {e[1] for e in log[1:1 + n_tensors] if e[0] == "used_on"} == handed and len(handed) == n_tensors
        assert log[1 + n_tensors:] == ([("side",), ("event", i + 1), ("main",)] if i + 1 < STEPS else [])
        prefetched = feed.ready[i + 1][0] if i + 1 < STEPS else None
        for layer in layers:  # the values are the step's, with zeros for the element without EAA
            k, v = payloads[layer.name].keys, payloads[layer.name].values
            assert torch.equal(k[0], conds[0].steps[i][layer.name][0]) and torch.equal(v[2], conds[2].steps[i][layer.name][1])
            assert not k[1].any() and not v[1].any()
    assert not feed.ready


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_streamed_equals_resident_while_the_device_lags():
    pipe = Pipeline(build_random(TINY, seed=0), "cuda", torch.float16)
    conds = [random_condition(pipe.layers, STEPS, 1), random_condition(pipe.layers, STEPS, 2)]
    specs = [ImageSpec("p", 5, condition=conds[0], schedule=ScaleSchedule(0.9)), ImageSpec("q", 6),
             ImageSpec("r", 7, condition=conds[1], schedule=ScaleSchedule(0.7))]

    def lag(i, steps):
        # ~50 ms of GPU time queued after every step: the device falls further behind the host each
        # step, so freed K/V blocks are reused by later prefetches while earlier steps still queue.
        torch.cuda._sleep(100_000_000)

    images = {}
    for placement in ("resident", "streamed"):
        config = SamplingConfig(steps=STEPS, guidance=5.0, height=64, width=64, eaa_placement=placement)
        images[placement] = pipe.generate(config, specs, on_step=lag).images
    assert torch.equal(images["resident"], images["streamed"])

"""The fast torch backend: config, bucket keys, static buffers (with a fake graph), and the CPU
path against the reference pipeline. GPU-only checks (real CUDA graphs, fp16/bf16, SDPA
backends, SD1.5 shapes) are marked `gpu` and skipped without CUDA.

The kernel path on CPU is tested in tests/kernels/test_fast_torch_cpu.py.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pidrt.engines import fast_torch
from pidrt.engines.cuda_graphs import EagerCapturer, GraphedUNet, NotGraphable, bucket_key
from pidrt.engines.fast_torch import FastTorchConfig, SDPAOverride, make_fast, pick_sdpa_backend
from pidrt.errors import PidrtError
from pidrt.models.adapters import IPAdapterWeights, SCAAdapter, layer_tokens
from pidrt.models.attention import EAAKV, BranchState, EAARows, FoldedLayer, UnfoldedBranch
from pidrt.models.branches import IPIdentity, SCAIdentity, eaa_payloads, few_token_payloads, folded_of
from pidrt.models.build import build_random
from pidrt.models.folded import FoldedBranch
from pidrt.models.presets import SD15, TINY
from pidrt.models.retouch import SwapLayer
from pidrt.models.conditions import EAACondition, FewTokenCondition, FoldedCondition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU32 = FastTorchConfig(dtype=torch.float32, kernels=False, cuda_graphs=False)


# ---------------------------------------------------------------- helpers

def folded(n_tokens=4, batch=2, c=8, heads=2, seed=0) -> FoldedLayer:
    g = torch.Generator().manual_seed(seed)
    hn = heads * n_tokens
    return FoldedLayer("z", FoldedBranch(torch.randn(batch, c, hn, generator=g), torch.randn(batch, hn, c, generator=g),
                                         torch.randn(batch, hn, generator=g), torch.randn(batch, c, generator=g), n_tokens))


def state_with(layers, scale=(0.5, 1.0)) -> BranchState:
    return BranchState(scale=None if scale is None else torch.tensor(scale), layers=dict(layers))


def sca_condition(layers, dim, seed) -> FewTokenCondition:
    adapter = SCAAdapter.random(layers, dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
    return FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                             SCAIdentity(adapter, adapter.mapping.unconditional()[0]))


def ip_condition(layers, dim, seed) -> FewTokenCondition:
    adapter = IPAdapterWeights.random(layers, dim, seed=seed, embeddings_dim=16)
    embed = torch.randn(1, 16, generator=torch.Generator().manual_seed(seed))
    return FewTokenCondition("ip", IPIdentity(adapter, adapter.image_proj(embed)[0]),
                             IPIdentity(adapter, adapter.image_proj(torch.zeros_like(embed))[0]))


def folded_condition(unet, layers, cond: FewTokenCondition) -> FoldedCondition:
    """The identity artifact form (folded on CPU, as enrollment stores it): usable on any device."""
    halves = {h: few_token_payloads(unet, layers, [getattr(cond, h)]) for h in ("cond", "uncond")}
    query = next(iter(halves["cond"].values())).query
    return FoldedCondition(cond.method, query, folded_of(halves["cond"]), folded_of(halves["uncond"]))


def random_eaa(layers, preset, steps, seed, s_c=16) -> EAACondition:
    g = torch.Generator().manual_seed(seed)
    latent = preset.resolution // preset.latent_scale
    n_levels = len(preset.unet.block_out_channels)

    def kv(layer):
        m = layer_tokens(layer.name, latent, n_levels) if layer.kind == "self" else s_c
        return torch.randn(m, layer.channels, generator=g) * 0.5, torch.randn(m, layer.channels, generator=g)

    return EAACondition([{layer.name: kv(layer) for layer in layers} for _ in range(steps)])


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def ref():
    return Pipeline(build_random(TINY, seed=0))


# ---------------------------------------------------------------- config and errors

def test_config_normalises_and_validates():
    assert FastTorchConfig(dtype="fp16").dtype is torch.float16
    assert FastTorchConfig(dtype="bfloat16").dtype is torch.bfloat16
    for bad in (dict(dtype="int8"), dict(dtype=torch.int8), dict(sdpa_backend="cutlass"), dict(max_buckets=0),
                dict(compile_mode="default"), dict(compile=True, compile_mode="reduce-overhead")):
        with pytest.raises(PidrtError):
            FastTorchConfig(**bad)
    # inductor's graphs are fine once ours are off
    FastTorchConfig(compile=True, compile_mode="reduce-overhead", cuda_graphs=False)


def test_clear_errors_off_gpu(monkeypatch):
    cpu = torch.device("cpu")
    not_touched = SimpleNamespace(device=cpu, models=None)  # errors come before any model work
    with pytest.raises(PidrtError, match="cuda_graphs=True needs a CUDA device"):
        make_fast(not_touched, FastTorchConfig(kernels=False))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PidrtError, match="TRITON_INTERPRET"):
        make_fast(not_touched, FastTorchConfig(cuda_graphs=False))
    with pytest.raises(PidrtError, match="needs a CUDA device"):
        FastTorchConfig(cuda_graphs=False, kernels=False, sdpa_backend="cudnn").check_device(cpu)
    if not torch.cuda.is_available():
        with pytest.raises(PidrtError, match="no CUDA device"):
            FastTorchConfig(kernels=False).check_device(torch.device("cuda"))
        with pytest.raises(PidrtError, match="CUDA graphs need a CUDA device"):
            fast_torch.CudaGraphCapturer(cpu)


# ---------------------------------------------------------------- bucket keys

def test_bucket_key_is_the_structure_not_the_values():
    x, ctx, t = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32), torch.tensor(500)
    key = lambda state, x=x, ctx=ctx: bucket_key(x, t, ctx, state)  # noqa: E731
    a = key(state_with({"l1": folded(seed=1)}))
    assert a == key(state_with({"l1": folded(seed=2)}, scale=(0.0, 0.3)))  # another identity, same bucket
    assert hash(a) == hash(key(state_with({"l1": folded(seed=3)})))
    others = [
        key(state_with({"l1": folded(n_tokens=16)})),  # token count
        key(state_with({"l2": folded()})),  # another layer
        key(state_with({"l1": folded()}, scale=None)),  # no scale: plain attention
        key(state_with({})),  # base UNet
        key(state_with({"l1": EAAKV(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))})),
        key(state_with({"l1": folded()}), x=torch.zeros(2, 4, 16, 8)),  # resolution
        key(state_with({"l1": folded(batch=1)}, scale=(1.0,)), x=torch.zeros(1, 4, 8, 8), ctx=torch.zeros(1, 77, 32)),
        key(state_with({"l1": UnfoldedBranch("z", torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 8, 8))})),
        key(state_with({"l1": UnfoldedBranch("z", torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 8, 8),
                                             w_o=torch.zeros(2, 8, 8))})),
    ]
    kernels = state_with({"l1": folded()})
    from pidrt.kernels.ops import TritonOps  # here: the kernels' conftest decides interpreter mode first

    kernels.fused = TritonOps()
    others.append(key(kernels))
    assert len({a, *others}) == len(others) + 1
    half = state_with({"l1": folded()})
    half.scale = half.scale.half()
    assert key(half) != a
    recording = state_with({})
    recording.record = {}
    with pytest.raises(NotGraphable, match="record"):
        key(recording)
    with pytest.raises(NotGraphable, match="EAARows"):
        key(state_with({"l1": EAARows([[0], [0]], {})}))
    tokens = state_with({})
    tokens.value_context = torch.zeros(2, 77, 8)  # read from the state, not a static slot: eager
    with pytest.raises(NotGraphable, match="token-identity contexts"):
        key(tokens)
    retouch = state_with({})
    retouch.swap = {"l1": SwapLayer(torch.arange(2), torch.arange(2))}  # indices change every step
    with pytest.raises(NotGraphable, match="Retouch"):
        key(retouch)


# ---------------------------------------------------------------- static buffers, fake graph

def fake_unet(state: BranchState):
    """A 'UNet' whose output depends on every input and every payload tensor, per element."""

    def forward(x, t, ctx):
        out = x * 2 + t.to(x.dtype).view(-1, 1, 1, 1) + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if state.scale is not None:
            for name in sorted(state.layers):
                p = state.layers[name]
                tensors = ([p.branch.a, p.branch.b, p.branch.score_bias, p.branch.out_bias]
                           if isinstance(p, FoldedLayer) else [p.keys, p.values])
                total = sum(t_.flatten(1).sum(1) * (i + 1) for i, t_ in enumerate(tensors))
                out = out + (state.scale * total).view(-1, 1, 1, 1)
        return out

    return forward


def test_static_buffers_follow_every_input_with_a_fake_graph():
    state = BranchState()
    forward, cap = fake_unet(state), EagerCapturer()
    graphed = GraphedUNet(forward, state, cap, channels_last=True, max_buckets=2)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)

    def check(t=500):
        want = forward(x, torch.as_tensor(t).expand(2), ctx)
        got = graphed(x, t, ctx)
        assert torch.equal(got, want) and got.is_contiguous()
        return got

    layers = {"l1": folded(seed=1), "l2": folded(seed=2)}
    state.layers, state.scale = layers, torch.tensor([0.5, 1.0])
    check()
    check(torch.tensor(20))  # a new timestep, same tensors: the payload copies are skipped
    assert cap.captures == 1 and graphed.stats.copies_skipped >= 3
    layers["l1"].branch.a.mul_(3)  # in place: the version counter changes, it is copied again
    check()
    state.layers = {"l1": folded(seed=5), "l2": folded(seed=6)}  # another identity, same bucket
    state.scale = torch.tensor([0.0, 0.7])
    x = x + 1
    ctx = ctx * 2
    held = check(7)
    assert cap.captures == 1
    check(900)  # the returned tensor is a copy: a later replay leaves what a caller holds alone
    assert torch.equal(held, forward(x, torch.tensor(7).expand(2), ctx))

    state.layers = {"l1": folded(n_tokens=2)}  # another structure: a new bucket
    check()
    assert cap.captures == 2
    state.layers = {}
    check()
    assert cap.captures == 3 and graphed.stats.evictions == 1 and len(graphed.buckets) == 2

    state.record = {}
    check()
    state.record = None
    state.layers = {"l1": EAARows([[0], [0]], {})}
    graphed.forward = lambda x, t, c: x  # EAARows needs a real UNet; the routing is what is tested
    graphed(x, 1, ctx)
    assert graphed.stats.eager == {"feature recording (state.record)": 1, "EAARows payload (recompute placement)": 1}
    assert cap.captures == 3


def test_a_failed_capture_runs_eagerly_with_a_warning():
    class Broken:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    state = BranchState(scale=torch.ones(1))
    graphed = GraphedUNet(fake_unet(state), state, Broken())
    x, ctx = torch.ones(1, 4, 2, 2), torch.ones(1, 77, 4)
    for attempt in range(3):
        with pytest.warns(RuntimeWarning, match=f"not captured \\(attempt {attempt + 1} of 3"):
            out = graphed(x, 3, ctx)
        assert torch.equal(out, fake_unet(state)(x, torch.tensor([3]), ctx))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed(x, 3, ctx)  # given up on: eager without a further attempt
    assert sum(graphed.stats.eager.values()) == 4 and graphed.stats.captures == 0


# ---------------------------------------------------------------- SDPA choice and the xformers hook

def test_sdpa_override_routes_plain_attention_only():
    seen = []

    def fake_xformers(q, k, v):  # [B, N, H, d], as xformers.ops.memory_efficient_attention takes
        seen.append(q.shape)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, n, 16, generator=g) for n in (10, 7, 7))
    want = F.scaled_dot_product_attention(q, k, v)
    with SDPAOverride(fake_xformers) as mode:
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(10, 7, dtype=torch.bool))
        F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
    assert seen == [(2, 10, 8, 16)] and mode.calls == 1
    assert (got - want).abs().max() < 1e-6


def test_pick_sdpa_backend_takes_the_fastest_that_runs():
    def run(name):
        if name == "flash":
            raise RuntimeError("No available kernel. Aborting execution.")
        return name

    fake_ms = {"cudnn": 1.5, "efficient": 0.9}
    best, timings = pick_sdpa_backend(run, ["cudnn", "flash", "efficient"], timer=lambda fn: fake_ms[fn()])
    assert best == "efficient"
    assert timings["cudnn"] == 1.5 and timings["flash"].startswith("unavailable: RuntimeError")
    assert pick_sdpa_backend(run, ["flash"], timer=lambda fn: fn())[0] is None
    # cudnn is faster here but its output is off: it is rejected before its time counts
    outputs = {"cudnn": torch.tensor([1.0]), "efficient": torch.tensor([2.0])}
    best, timings = pick_sdpa_backend(outputs.get, ["cudnn", "efficient"], timer=lambda fn: 3 - float(fn()),
                                      validate=fast_torch.close_to(torch.tensor([2.0]), 1e-2))
    assert best == "efficient" and timings["cudnn"].startswith("rejected: relative error 5.00e-01")


# ---------------------------------------------------------------- the tiny UNet on CPU

CFG = SamplingConfig(steps=2, guidance=5.0, height=64, width=64)


def test_fast_pipeline_matches_reference_with_fake_graphs(ref):
    cap = EagerCapturer()
    fast = make_fast(ref, CPU32, capturer=cap)
    assert fast.models.unet is not ref.models.unet and fast.state is not ref.state
    specs = {
        "sca_a": [ImageSpec("p", 5, condition=sca_condition(ref.layers, 32, 1), schedule=ScaleSchedule(0.8))],
        "sca_b": [ImageSpec("p", 5, condition=sca_condition(ref.layers, 32, 2), schedule=ScaleSchedule(0.6, start=1))],
        "none": [ImageSpec("q", 6)],
    }
    captures = {}
    for name, spec in specs.items():
        want = ref.generate(CFG, spec).images
        got = fast.generate(CFG, spec).images
        assert max_diff(got, want) < 1e-4, name
        captures[name] = cap.captures
    assert captures == {"sca_a": 1, "sca_b": 1, "none": 2}  # identity B replays identity A's graph
    # EAA cached features (random K/V of the right shapes) at the UNet-call level
    eaa = random_eaa(ref.layers, TINY, 1, seed=3)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    outs = []
    for pipe in (ref, fast):
        pipe.state.layers = eaa_payloads(pipe.layers, [eaa.steps[0], None])
        pipe.state.scale = torch.tensor([0.9, 0.0])
        outs.append(pipe.unet(x, torch.tensor(401), ctx))
        pipe.state.clear()
    assert max_diff(*outs) < 1e-4 and cap.captures == 3
    assert ref.state.fused is None and ref.models.unet.conv_in.weight.is_contiguous()  # the reference is untouched


def test_recording_runs_eagerly_through_the_fast_pipeline(ref):
    from pidrt.runtime.inversion import invert_and_record

    cap = EagerCapturer()
    fast = make_fast(ref, CPU32, capturer=cap)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = invert_and_record(ref, latents, "a face", 1, "inversion")
    got = invert_and_record(fast, latents, "a face", 1, "inversion")
    assert max_diff(got.latent_t, want.latent_t) < 1e-4
    name = ref.layers[0].name
    assert max_diff(got.features[0][name], want.features[0][name]) < 1e-5
    assert cap.captures == 0 and fast.report()["graphs"]["eager"] == {"feature recording (state.record)": 1}


def test_auto_sdpa_times_validates_and_bakes_in_the_choice(ref, monkeypatch):
    fast = make_fast(ref, CPU32)
    # CPU has no cuDNN attention and times nothing by default; pretend it is a GPU with three.
    monkeypatch.setattr(fast, "auto_candidates", lambda: ["cudnn", "math", "flash"])
    fast.sdpa_timer = lambda fn: (fn(), {"math": 2.0, "flash": 1.0}[fast.sdpa_choice[shape]])[1]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    shape = ((1, 4, 8, 8), (1, 77, 32))
    out = fast.unet(x, 10, ctx)
    assert fast.sdpa_choice[shape] == "flash"
    timings = fast.sdpa_timings[shape]
    assert timings["cudnn"].startswith("unavailable") and timings["math"] == 2.0
    assert max_diff(out, ref.unet(x, 10, ctx)) < 1e-4


def test_compile_wraps_the_unet(ref, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    fast = make_fast(ref, FastTorchConfig(dtype="float32", kernels=False, cuda_graphs=False, compile=True,
                                          compile_mode="max-autotune-no-cudagraphs"))
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    assert fast.report()["config"]["compile"] is True


# ---------------------------------------------------------------- GPU

def _gpu_pipes(dtype, config: FastTorchConfig):
    """(reference, fast, identities) on the tiny preset; folded identities built on CPU first."""
    models = build_random(TINY, seed=0)
    layers = Pipeline(models).layers
    conds = {
        "sca": folded_condition(models.unet, layers, sca_condition(layers, 32, 1)),
        "sca2": folded_condition(models.unet, layers, sca_condition(layers, 32, 2)),
        "ip": folded_condition(models.unet, layers, ip_condition(layers, 32, 3)),
        "eaa": random_eaa(layers, TINY, CFG.steps, seed=4),
        "none": None,
    }
    reference = Pipeline(models, "cuda", dtype)
    return reference, make_fast(reference, config), conds


@contextlib.contextmanager
def _no_tf32():
    """fp32 compares NCHW (reference) with channels_last (fast), which cuDNN runs with other
    kernels; with TF32 on (cuDNN's default) both round inputs to 10 mantissa bits differently and
    the 5e-3 tolerance would measure TF32, not the fast path. Restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol,fused_norms", [(torch.float32, 5e-3, False), (torch.float16, 3e-2, False),
                                                   (torch.float16, 3e-2, True)])
def test_gpu_images_match_reference(dtype, tol, fused_norms):
    reference, fast, conds = _gpu_pipes(dtype, FastTorchConfig(dtype=dtype, fused_norms=fused_norms))
    with _no_tf32() if dtype == torch.float32 else contextlib.nullcontext():
        for name, cond in conds.items():
            for placement in (("resident", "streamed") if name == "eaa" else ("resident",)):
                config = SamplingConfig(**{**vars(CFG), "eaa_placement": placement})
                spec = [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(0.8)), ImageSpec("q", 6)]
                want = reference.generate(config, spec).images
                got = fast.generate(config, spec).images
                assert torch.isfinite(got).all() and max_diff(got, want) < tol, (name, placement)
    stats = fast.report()["graphs"]
    # sca and sca2 share a graph; ip (query x), eaa, none each have one
    assert stats["captures"] == 4 and not stats["eager"], stats


@pytest.mark.gpu
@gpu
def test_gpu_bf16_matches_reference():
    reference, fast, conds = _gpu_pipes(torch.bfloat16, FastTorchConfig(dtype="bf16"))
    spec = [ImageSpec("p", 5, condition=conds["sca"], schedule=ScaleSchedule(0.8))]
    got = fast.generate(CFG, spec).images
    assert torch.isfinite(got).all() and max_diff(got, reference.generate(CFG, spec).images) < 6e-2


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_gpu_sd15_step_with_each_sdpa_backend_matches_fp32_reference():
    """SD1.5 shapes (head dims 40/80/160, 4096 tokens): fp16 fast step and its graph replay."""
    from pidrt.models.folded import stack_folded

    models = build_random(SD15, seed=0)
    layers = Pipeline(models).layers
    cond = folded_condition(models.unet, layers, sca_condition(layers, 768, 1))
    reference = Pipeline(models, "cuda", torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g).cuda(), torch.randn(2, 77, 768, generator=g).cuda()

    def step(pipe):
        pipe.state.layers = {n: FoldedLayer(cond.query, stack_folded([cond.uncond[n], cond.cond[n]]).to("cuda", pipe.dtype))
                             for n in cond.cond}
        pipe.state.scale = torch.tensor([0.4, 0.4], device="cuda", dtype=pipe.dtype)
        try:
            return pipe.unet(x, torch.tensor(501), ctx).float(), pipe.unet(x, torch.tensor(501), ctx).float()
        finally:
            pipe.state.clear()

    want = step(reference)[0]
    ran = {}
    for backend in ("auto", "cudnn", "flash", "efficient", "math"):
        fast = make_fast(reference, FastTorchConfig(sdpa_backend=backend))
        try:
            first, replay = step(fast)
        except RuntimeError as exc:  # a backend this GPU/torch build lacks: say which, require the rest
            ran[backend] = f"unavailable: {exc}"
            continue
        finally:
            del fast
            gc.collect()  # fast.graphed.forward refers back to fast: a cycle that only the collector frees
            torch.cuda.empty_cache()
        rel = float((first - want).norm() / want.norm())
        assert torch.equal(first, replay) and rel < 1e-2, (backend, rel)
        ran[backend] = rel
    assert isinstance(ran["auto"], float) and isinstance(ran["math"], float), ran

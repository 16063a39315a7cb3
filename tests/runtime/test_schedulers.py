"""pidrt.runtime.schedulers against the diffusers schedulers, step for step.

The diffusers schedulers are built from ``asdict(SchedulerConfig())`` plus ``clip_sample=False``:
the SD1.5 scheduler config disables clipping, but ``SchedulerConfig`` has no such field and the
diffusers constructors default it to True.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler

from pidrt.errors import PidrtError
from pidrt.models.presets import SchedulerConfig
from pidrt.runtime.schedulers import (
    DDIM,
    DDIMInverse,
    DPMSolverPP2M,
    add_noise,
    alphas_cumprod,
    make_scheduler,
)

# diffusers' DPM scheduler trips numpy 2's __array__(copy=) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

SHAPE = (2, 4, 8, 8)
EPS_CFG = SchedulerConfig()
V_CFG = dataclasses.replace(SchedulerConfig(), prediction_type="v_prediction")


def _ref(kind: str, cfg: SchedulerConfig, steps: int):
    kw = dataclasses.asdict(cfg)
    if kind == "ddim":
        s = DDIMScheduler(**kw, clip_sample=False)
    elif kind == "ddim_inverse":
        s = DDIMInverseScheduler(**kw, clip_sample=False)
    else:
        kw.pop("set_alpha_to_one")  # not a DPMSolverMultistepScheduler argument
        s = DPMSolverMultistepScheduler(
            **kw, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True
        )
    s.set_timesteps(steps)
    return s


def _model_outputs(kind: str, cfg: SchedulerConfig, timesteps: torch.Tensor, seed: int):
    """Start sample and per-step model outputs: a fixed (x0, eps) target plus seeded noise.

    Pure N(0, 1) outputs would be inconsistent with the sample, pushing epsilon-DDIM latents to
    |x| ~ 50 where one float32 ulp is already 4e-6; centring them on a consistent target keeps
    |x| ~ 4, as real SD latents are, so atol 1e-5 measures the scheduler, not float32 spacing.
    """
    g = torch.Generator().manual_seed(seed)
    x0, e0 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x = x0 if kind == "ddim_inverse" else add_noise(cfg, x0, e0, int(timesteps[0]))
    ac = alphas_cumprod(cfg)
    outs = []
    for t in timesteps.tolist():
        a = ac[t]
        target = e0 if cfg.prediction_type == "epsilon" else a.sqrt() * e0 - (1 - a).sqrt() * x0
        outs.append(target + 0.1 * torch.randn(SHAPE, generator=g))
    return x, outs


def _compare(kind: str, cfg: SchedulerConfig, steps: int, seed: int = 0) -> None:
    ref = _ref(kind, cfg, steps)
    forced, free = make_scheduler(kind, cfg, steps), make_scheduler(kind, cfg, steps)
    assert forced.timesteps.dtype == torch.int64 and forced.timesteps.device.type == "cpu"
    assert torch.equal(forced.timesteps, ref.timesteps)
    assert len(forced) == steps
    x, outs = _model_outputs(kind, cfg, ref.timesteps, seed)
    x_ref = x_free = x
    for i, t in enumerate(ref.timesteps):
        # Step for step: ours is fed diffusers' sample, so each step is checked on its own.
        x_forced = forced.step(outs[i], i, forced.scale_model_input(x_ref, i))
        x_ref = ref.step(outs[i], t, x_ref).prev_sample
        assert x_forced.dtype == torch.float32
        torch.testing.assert_close(x_forced, x_ref, atol=1e-5, rtol=0, msg=lambda m: f"step {i}: {m}")
        # Free running: float32 rounding differences are amplified along the chain (by up to
        # sqrt(a_end / a_start) ~ 15 for SD1.5), so two exact float32 implementations, diffusers'
        # included, drift ~1e-5 apart (and each ~1e-5 from a float64 run) after 50 steps.
        x_free = free.step(outs[i], i, x_free)
        torch.testing.assert_close(x_free, x_ref, atol=5e-5, rtol=0, msg=lambda m: f"free step {i}: {m}")


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
def test_matches_diffusers_epsilon(kind, steps):
    _compare(kind, EPS_CFG, steps)


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
def test_matches_diffusers_v_prediction(kind, steps):
    _compare(kind, V_CFG, steps, seed=1)


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
def test_matches_diffusers_other_spacings(kind, spacing, steps):
    if kind == "ddim_inverse" and spacing == "linspace":
        with pytest.raises(PidrtError, match="linspace"):
            make_scheduler(kind, dataclasses.replace(EPS_CFG, timestep_spacing=spacing), steps)
        return
    _compare(kind, dataclasses.replace(EPS_CFG, timestep_spacing=spacing, steps_offset=0), steps)


def test_set_alpha_to_one():
    cfg = dataclasses.replace(EPS_CFG, set_alpha_to_one=True)
    _compare("ddim", cfg, 10)
    _compare("ddim_inverse", cfg, 10)


def test_ddim_inverse_round_trip_constant_eps():
    # With a constant eps both chains stay on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, so DDIM lands
    # on the t=0 point of that line and the inversion walks back to exactly the starting x_T.
    cfg, steps = EPS_CFG, 50
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    fwd, inv = DDIM(cfg, steps), DDIMInverse(cfg, steps)
    assert torch.equal(inv.timesteps, fwd.timesteps.flip(0))
    x_T = add_noise(cfg, x0, eps, int(fwd.timesteps[0]))
    x = x_T
    for i in range(steps):
        x = fwd.step(eps, i, x)
    torch.testing.assert_close(x, add_noise(cfg, x0, eps, 0), atol=1e-5, rtol=0)
    for i in range(steps):
        x = inv.step(eps, i, x)
    torch.testing.assert_close(x, x_T, atol=1e-5, rtol=0)


def test_add_noise_matches_diffusers():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = _ref("ddim", EPS_CFG, 10)
    t = torch.tensor([0, 999])
    torch.testing.assert_close(add_noise(EPS_CFG, x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    t1 = torch.tensor([501])
    torch.testing.assert_close(add_noise(EPS_CFG, x0, noise, 501), ref.add_noise(x0, noise, t1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
def test_fp16_keeps_dtype(kind):
    steps = 10
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    outs = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    s16, s32 = make_scheduler(kind, EPS_CFG, steps), make_scheduler(kind, EPS_CFG, steps)
    x16, x32 = x.half(), x
    for i in range(steps):
        x16 = s16.step(outs[i].half(), i, x16)
        x32 = s32.step(outs[i], i, x32)
        assert x16.dtype == torch.float16
    # Only input/output rounding to fp16 differs; samples grow to ~10, so a loose absolute bound.
    torch.testing.assert_close(x16.float(), x32, atol=0.1, rtol=0.01)


def test_dpm_is_stateful_and_resettable():
    s = DPMSolverPP2M(EPS_CFG, 5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(SHAPE, generator=g)
    outs = [torch.randn(SHAPE, generator=g) for _ in range(5)]

    def run():
        y = x
        for i in range(5):
            y = s.step(outs[i], i, y)
        return y

    first = run()
    with pytest.raises(PidrtError, match="i=0"):
        s.step(outs[0], 0, x)
    s.reset()
    assert torch.equal(run(), first)
    s.reset()
    with pytest.raises(PidrtError, match="i=2"):
        s.step(outs[0], 2, x)


@pytest.mark.parametrize("start", [3, 9])
def test_dpm_begin_index_matches_diffusers(start):
    # img2img: the chain starts part way, first order there (diffusers' set_begin_index).
    steps = 10
    ref, ours = _ref("dpm++2m", EPS_CFG, steps), DPMSolverPP2M(EPS_CFG, steps)
    ref.set_begin_index(start)
    ours.reset(start)
    x, outs = _model_outputs("dpm++2m", EPS_CFG, ref.timesteps, seed=7)
    x_ref = x_ours = x
    for i in range(start, steps):
        x_ref = ref.step(outs[i], ref.timesteps[i], x_ref).prev_sample
        x_ours = ours.step(outs[i], i, x_ours)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=0, msg=lambda m: f"step {i}: {m}")
    with pytest.raises(PidrtError, match="start"):
        ours.reset(steps)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "10"])
def test_bad_steps(kind, steps):
    with pytest.raises(PidrtError, match=repr(steps).replace("(", r"\(")):
        make_scheduler(kind, EPS_CFG, steps)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "dpm++2m"])
def test_rejects_schedules_outside_training_range(kind):
    # With steps_offset=1, "leading" puts the top timestep at N (DDIM, steps = N; DPM, which uses
    # N // (steps + 1), already at steps = N - 1), where diffusers raises IndexError or clamps.
    # DPM at steps = N repeats one timestep, where diffusers returns NaN.
    for steps in (999, 1000) if kind == "dpm++2m" else (1000,):
        with pytest.raises(PidrtError, match=f"steps={steps} does not fit"):
            make_scheduler(kind, EPS_CFG, steps)
    cfg = dataclasses.replace(EPS_CFG, steps_offset=0)
    assert make_scheduler(kind, cfg, 999 if kind == "dpm++2m" else 1000).timesteps.max() == 999
    with pytest.raises(PidrtError, match="steps=1000 does not fit"):
        make_scheduler("dpm++2m", cfg, 1000)


def test_unknown_name_and_bad_config():
    with pytest.raises(PidrtError, match="ddim.*dpm\\+\\+2m.*ddim_inverse"):
        make_scheduler("euler_a", EPS_CFG, 10)
    with pytest.raises(PidrtError, match="sample"):
        DDIM(dataclasses.replace(EPS_CFG, prediction_type="sample"), 10)
    with pytest.raises(PidrtError, match="squaredcos"):
        DDIM(dataclasses.replace(EPS_CFG, beta_schedule="squaredcos_cap_v2"), 10)


def test_sampler_surface():
    s = DDIM(EPS_CFG, 50)
    x = torch.randn(SHAPE)
    assert s.init_noise_sigma == 1.0 and s.scale_model_input(x, 0) is x
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1

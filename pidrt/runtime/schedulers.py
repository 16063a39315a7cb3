"""Samplers (DDIM, DPM-Solver++ 2M) and DDIM inversion, numerically matching diffusers.

diffusers' schedulers re-derive their coefficients from ``alphas_cumprod`` on every call, mixing
tensor and Python arithmetic, and index by timestep value. Here each step is reduced once, in
``__init__`` and in float64, to a few Python floats per step index, so ``step`` is one or two fused
tensor ops with no host/device traffic and no lookups; that is also what a CUDA graph or an
exported loop wants. Timestep schedules are built with the same numpy expressions diffusers uses,
so they are bit-identical (the UNet is conditioned on them).

Not supported (SD1.5 uses none of them): ``clip_sample``/thresholding, eta > 0, the ``sample``
prediction type, Karras/exponential sigmas. The SD1.5 ``scheduler_config.json`` has
``clip_sample: false`` while the diffusers constructors default it to True, so a diffusers
scheduler built from ``SchedulerConfig`` alone clips and differs from this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pidrt.errors import PidrtError
from pidrt.models.presets import SchedulerConfig

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """Cumulative alpha products in float32, computed exactly as diffusers does (same op order)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    else:
        raise PidrtError(
            f"beta_schedule {config.beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(config: SchedulerConfig, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0), as ``DDIMScheduler.add_noise``; ``t`` is an int or one per sample.

    Computed in float32 whatever the input dtype (diffusers computes in the input dtype), returned in
    the dtype of ``x0``.
    """
    ac = alphas_cumprod(config).to(x0.device)
    t = torch.as_tensor(t, dtype=torch.long, device=x0.device).flatten()
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = ac[t].reshape(shape)
    out = a**0.5 * x0.float() + (1 - a) ** 0.5 * noise.float()
    return out.to(x0.dtype)


def _check(config: SchedulerConfig, steps) -> int:
    n = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise PidrtError(f"steps must be an integer in 1..{n}, got {steps!r}")
    if config.prediction_type not in _PREDICTION_TYPES:
        raise PidrtError(
            f"prediction_type {config.prediction_type!r} is not supported; use one of {_PREDICTION_TYPES}"
        )
    return int(steps)


def _spacing_error(config: SchedulerConfig, valid: tuple[str, ...]) -> PidrtError:
    return PidrtError(f"timestep_spacing {config.timestep_spacing!r} is not supported here; use one of {valid}")


def _ddim_coeffs(a_from: float, a_to: float, prediction_type: str) -> tuple[float, float]:
    """(c_x, c_out) with x_to = c_x * x_from + c_out * model_output: the eta=0 DDIM update folded
    through the x0 / eps predictions, so it serves both denoising and inversion."""
    sf, nf, st, nt = math.sqrt(a_from), math.sqrt(1 - a_from), math.sqrt(a_to), math.sqrt(1 - a_to)
    if prediction_type == "epsilon":  # x0 = (x - nf eps) / sf
        return st / sf, nt - st * nf / sf
    # v: x0 = sf x - nf v, eps = sf v + nf x
    return st * sf + nt * nf, nt * sf - st * nf


class _Sampler:
    """Shared surface: the loop calls ``scale_model_input`` then the UNet then ``step``."""

    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig, steps: int):
        self.config = config
        self.steps = _check(config, steps)
        self.timesteps: torch.Tensor  # int64, CPU, the values fed to the UNet

    def _set_timesteps(self, ts: np.ndarray) -> None:
        # At the edges diffusers indexes past alphas_cumprod (steps = N with steps_offset = 1), or
        # for DPM "leading" repeats one timestep and its second-order step returns NaN.
        N, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if ts.min() < 0 or ts.max() >= N or len(np.unique(ts)) != len(ts):
            raise PidrtError(
                f"steps={self.steps} does not fit timestep_spacing {spacing!r} with steps_offset="
                f"{self.config.steps_offset} and {N} train timesteps: the schedule leaves 0..{N - 1} "
                "or repeats timesteps"
            )
        self.timesteps = torch.from_numpy(ts)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def reset(self, start: int = 0) -> None:
        """Begin a chain at step index ``start`` (img2img). DDIM keeps nothing between steps."""

    def join(self, rows: torch.Tensor) -> None:
        """Batch rows (bool [B]) whose chain begins at the next ``step`` while the others go on: img2img
        elements of different strengths sharing a batch. DDIM keeps nothing between steps."""

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, prediction_type={self.config.prediction_type!r})"


class _DDIMFamily(_Sampler):
    """DDIM and its inverse only differ in which alphas a step goes between."""

    def _fold(self, pairs: list[tuple[float, float]]) -> None:
        coeffs = [_ddim_coeffs(a, b, self.config.prediction_type) for a, b in pairs]
        self._cx = [c[0] for c in coeffs]
        self._ce = [c[1] for c in coeffs]

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        out = torch.add(x.float() * self._cx[i], eps.float(), alpha=self._ce[i])
        return out.to(x.dtype)


class DDIM(_DDIMFamily):
    """Deterministic (eta = 0) DDIM, as diffusers ``DDIMScheduler`` with ``clip_sample=False``."""

    def __init__(self, config: SchedulerConfig, steps: int):
        super().__init__(config, steps)
        n, N = self.steps, config.num_train_timesteps
        if config.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.int64) + config.steps_offset
        elif config.timestep_spacing == "trailing":
            ts = np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        elif config.timestep_spacing == "linspace":
            ts = np.linspace(0, N - 1, n).round()[::-1].copy().astype(np.int64)
        else:
            raise _spacing_error(config, ("leading", "trailing", "linspace"))
        self._set_timesteps(ts)
        ac = alphas_cumprod(config).double().tolist()
        final = 1.0 if config.set_alpha_to_one else ac[0]
        # diffusers steps to t - N // n whatever the spacing, not to the next scheduled timestep.
        self._fold([(ac[t], ac[t - N // n] if t - N // n >= 0 else final) for t in ts.tolist()])


class DDIMInverse(_DDIMFamily):
    """DDIM inversion x_0 -> x_T, as diffusers ``DDIMInverseScheduler`` with ``clip_sample=False``.

    Step i goes from alpha[t_i - N // n] (``alphas_cumprod[0]``, or 1 with ``set_alpha_to_one``,
    when that is negative) to alpha[t_i], so the model is evaluated at the *target* timestep t_i.
    With the same config the chain runs through exactly the alphas that ``DDIM`` walks down.
    """

    def __init__(self, config: SchedulerConfig, steps: int):
        super().__init__(config, steps)
        n, N = self.steps, config.num_train_timesteps
        if config.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (N // n)).round().copy().astype(np.int64) + config.steps_offset
        elif config.timestep_spacing == "trailing":
            ts = np.round(np.arange(N, 0, -N / n)[::-1]).astype(np.int64) - 1
        else:
            raise _spacing_error(config, ("leading", "trailing"))
        self._set_timesteps(ts)
        ac = alphas_cumprod(config).double().tolist()
        initial = 1.0 if config.set_alpha_to_one else ac[0]
        pairs = []
        for t in ts.tolist():
            src = min(t - N // n, N - 1)
            pairs.append((ac[src] if src >= 0 else initial, ac[t]))
        self._fold(pairs)


class DPMSolverPP2M(_Sampler):
    """DPM-Solver++ (2M), as diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2, lower_order_final=True)`` with the default midpoint solver and zero final sigma.

    Works on x0 predictions; the second-order correction needs the previous step's x0, hence the
    state and the strict call order. The first step of a chain and the last one are first order
    (the last lands on sigma = 0, where the multistep correction is undefined), as in diffusers.
    img2img starts part way with ``reset(start)``, like diffusers' ``set_begin_index(start)``.
    """

    def __init__(self, config: SchedulerConfig, steps: int):
        super().__init__(config, steps)
        n, N = self.steps, config.num_train_timesteps
        if config.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
            ts += config.steps_offset
        elif config.timestep_spacing == "trailing":
            ts = np.arange(N, 0, -N / n).round().copy().astype(np.int64) - 1
        elif config.timestep_spacing == "linspace":
            ts = np.linspace(0, N - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        else:
            raise _spacing_error(config, ("leading", "trailing", "linspace"))
        self._set_timesteps(ts)
        ac = alphas_cumprod(config)
        # diffusers keeps sigma = sqrt((1 - a) / a) as float32; start from the same rounded values.
        sig = (((1 - ac) / ac) ** 0.5).double().tolist()
        s = [sig[t] for t in ts.tolist()] + [0.0]
        alpha = [1 / math.sqrt(v * v + 1) for v in s]
        sigma = [v * a for v, a in zip(s, alpha)]
        v_pred = config.prediction_type == "v_prediction"
        # x0 = _kx * x + _km * model_output
        self._kx = [alpha[i] if v_pred else 1 / alpha[i] for i in range(n)]
        self._km = [-sigma[i] if v_pred else -s[i] for i in range(n)]
        # x_next = _cx * x + _c0 * x0 + _c1 * x0_prev, or _cx * x + _d * x0 as the first step.
        self._cx, self._d, self._c0, self._c1 = [], [], [], []
        for i in range(n):
            exp_neg_h = s[i + 1] / s[i]  # lambda = -log(s), so exp(-h) = s_next / s_now
            d = alpha[i + 1] * (1 - exp_neg_h)
            self._cx.append(sigma[i + 1] / sigma[i])
            self._d.append(d)
            if i == 0 or i == n - 1:
                self._c0.append(d)
                self._c1.append(0.0)
            else:
                r0 = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
                self._c0.append(d * (1 + 0.5 / r0))
                self._c1.append(-d * 0.5 / r0)
        self.reset()

    def reset(self, start: int = 0) -> None:
        """Forget the previous x0 so the sampler can run another chain, beginning at index ``start``."""
        if not 0 <= start < self.steps:
            raise PidrtError(f"start must be in 0..{self.steps - 1}, got {start!r}")
        self._prev: torch.Tensor | None = None
        self._joining: torch.Tensor | None = None
        self._next = start

    def join(self, rows: torch.Tensor) -> None:
        self._joining = rows

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        if i != self._next:
            raise PidrtError(
                f"DPMSolverPP2M.step called with i={i}, expected i={self._next}; call reset() to start over"
            )
        xf = x.float()
        x0 = torch.add(xf * self._kx[i], eps.float(), alpha=self._km[i])
        if self._prev is None:
            out = torch.add(xf * self._cx[i], x0, alpha=self._d[i])
        else:
            prev = self._prev
            if self._joining is not None:
                # c0 + c1 = d: a row whose previous x0 is its own takes the first-order update.
                prev = torch.where(self._joining.reshape(-1, *([1] * (x0.dim() - 1))), x0, prev)
            out = torch.add(xf * self._cx[i], x0, alpha=self._c0[i])
            if self._c1[i] != 0.0:
                out.add_(prev, alpha=self._c1[i])
        self._prev, self._joining = x0, None
        self._next = i + 1
        return out.to(x.dtype)


_SCHEDULERS = {"ddim": DDIM, "dpm++2m": DPMSolverPP2M, "ddim_inverse": DDIMInverse}


def make_scheduler(name: str, config: SchedulerConfig, steps: int) -> _Sampler:
    """Build a sampler by its CLI / API name."""
    try:
        cls = _SCHEDULERS[name]
    except KeyError:
        raise PidrtError(f"unknown scheduler {name!r}; valid names: {', '.join(_SCHEDULERS)}") from None
    return cls(config, steps)

"""The torch text-to-image pipeline: text encoding, CFG as one batch, the scheduler loop, VAE decode.

Every image in a call has its own prompt, seed, identity, scale schedule, token identity and
edit (an init image, strength and mask: img2img / inpainting, pidrt.runtime.edits); they share
the step count, guidance, size and scheduler (they share UNet calls). An image's starting noise
is drawn from its own seed, so its seed decides it: bit for bit in a batch of the same
composition, within floating-point tolerance (about 1e-4, at most 1/255 after 8-bit rounding) in
another batch, where BLAS may take other paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.attention import FoldedLayer, attention_layers, branch_state
from pidrt.models.branches import few_token_payloads
from pidrt.models.build import Models
from pidrt.models.folded import stack_folded
from pidrt.models.tokens import TextKey, TokenIdentity, encode_texts
from pidrt.models.conditions import Condition, FewTokenCondition, FoldedCondition, ScaleSchedule
from pidrt.runtime.contexts import plan_contexts
from pidrt.runtime.eaa_feed import make_feed
from pidrt.runtime.edits import Edit, EditPlan
from pidrt.runtime.schedulers import make_scheduler

MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 30
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "ddim"
    folded: bool = True  # the folded few-token branch (exact, cheaper); False runs the papers' form
    eaa_placement: str = "resident"  # "resident" | "streamed" | "recompute" (pidrt.runtime.eaa_feed)

    def check(self, latent_scale: int) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise PidrtError(f"steps must be in 1..{MAX_STEPS}; got {self.steps}")
        for name, side in (("height", self.height), ("width", self.width)):
            if side <= 0 or side % latent_scale:
                raise PidrtError(f"{name} must be a positive multiple of {latent_scale}; got {side}")


@dataclass
class ImageSpec:
    prompt: str
    seed: int
    negative_prompt: str = ""
    condition: Condition | None = None
    schedule: ScaleSchedule = field(default_factory=ScaleSchedule)
    tokens: TokenIdentity | None = None  # its placeholder must be in `prompt` (docs/token-identities.md)
    edit: Edit | None = None  # img2img / inpainting; None: generated from noise


@dataclass
class Output:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor
    timings: dict[str, float]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype, device) -> torch.Tensor:
    """One CPU generator per image: the same seed gives the same noise on any device and batch."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


class Pipeline:
    """Runs SamplingConfig + ImageSpecs on one set of torch models (the reference backend)."""

    def __init__(self, models: Models, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.models = models.to(device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.layers = attention_layers(models.unet)
        self.state = branch_state(models.unet)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[TextKey]) -> torch.Tensor:
        """Ordinary prompts and token texts (a placeholder standing for learned vectors)."""
        return encode_texts(self.models.text_encoder, self.models.tokenizer, prompts, self.device).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        images = vae.decode(latents / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> latents (the distribution's mean: deterministic, as inversion wants)."""
        vae = self.models.vae
        dist = vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        return dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        return self.models.unet(x, t, encoder_hidden_states=ctx).sample

    def generate(self, config: SamplingConfig, specs: Sequence[ImageSpec],
                 on_step: Callable[[int, int], None] | None = None,
                 encode: Callable[[Sequence[str]], torch.Tensor] | None = None) -> Output:
        """Images for `specs`; `on_step(i, steps)` after each step (progress, cancellation by raising).

        `encode` replaces `encode_text` for this call (a server puts its text-embedding cache here).
        """
        if not specs:
            raise PidrtError("nothing to generate: no images requested")
        config.check(self.models.preset.latent_scale)
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        cfg = config.guidance != 1.0
        contexts = plan_contexts([s.prompt for s in specs], [s.negative_prompt for s in specs] if cfg else None,
                                 [s.tokens for s in specs], [layer.name for layer in self.layers if layer.kind == "cross"],
                                 self.models.preset.text.hidden_size)
        table = (encode or self.encode_text)(contexts.texts)
        timings["text_encode_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sched = make_scheduler(config.scheduler, self.models.preset.scheduler, config.steps)
        scale_f = self.models.preset.latent_scale
        shape = (self.models.preset.vae.latent_channels, config.height // scale_f, config.width // scale_f)
        noise = initial_noise([s.seed for s in specs], shape, self.dtype, self.device)
        encoding = time.perf_counter()
        plan = EditPlan(self, sched, [s.edit for s in specs], noise)
        timings["vae_encode_s"] = time.perf_counter() - encoding  # the edits' images
        clock += timings["vae_encode_s"]  # unet_loop_s: the rest, as before edits existed
        x = plan.x
        conditions = ([s.condition for s in specs] * (2 if cfg else 1))
        halves = (["uncond"] * len(specs) if cfg else []) + ["cond"] * len(specs)
        fixed = self._few_token_payloads(conditions, halves, config.folded)
        feed = make_feed(self, conditions, config.steps, config.eaa_placement, config.scheduler, plan.first)
        rows = feed.rows if feed is not None else 0
        # Steps before every element's start are skipped, except for recompute's reference rows,
        # which walk the whole schedule from P_T.
        first = 0 if rows else plan.first
        sched.reset(first)
        extra = plan.unet_channels(rows, cfg)
        schedules = [s.schedule for s in specs] * (2 if cfg else 1)
        # One host-to-device copy for the whole loop: a per-step copy would stall a GPU's queue.
        scales = torch.tensor(
            [[0.0] * rows + [sch.at(i) if c is not None else 0.0 for sch, c in zip(schedules, conditions)]
             for i in range(config.steps)], device=self.device, dtype=self.dtype,
        )
        try:
            for i in range(first, config.steps):
                t = sched.timesteps[i]
                self.state.layers = fixed if feed is None else feed.payloads(i)
                self.state.scale = scales[i]
                ctx_in, self.state.value_context, self.state.layer_contexts = contexts.at(
                    int(t), table, feed.ctx if rows else None)
                x_in = sched.scale_model_input(torch.cat([x, x]) if cfg else x, i)
                x_in = torch.cat([feed.x, x_in]) if rows else x_in
                eps = self.unet(x_in if extra is None else torch.cat([x_in, extra], dim=1), t, ctx_in)
                if rows:
                    feed.advance(eps[:rows], i)
                    eps = eps[rows:]
                if cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + config.guidance * (eps_c - eps_u)
                x = plan.step(sched, eps, i, x)
                if on_step is not None:
                    on_step(i, config.steps)
        finally:
            self.state.clear()
        timings["unet_loop_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        images = self.decode(x)
        timings["vae_decode_s"] = time.perf_counter() - clock
        return Output(images=images, latents=x, timings=timings)

    def _few_token_payloads(self, conditions, halves, folded: bool):
        if any(isinstance(c, FoldedCondition) for c in conditions):
            return self._prefolded_payloads(conditions, halves, folded)
        items = [
            (getattr(c, h) if isinstance(c, FewTokenCondition) else None) for c, h in zip(conditions, halves)
        ]
        return few_token_payloads(self.models.unet, self.layers, items, folded)

    def _prefolded_payloads(self, conditions, halves, folded: bool):
        if not folded:
            raise PidrtError("a folded identity artifact cannot run the unfolded reference; enroll from the adapter")
        if any(c is not None and not isinstance(c, FoldedCondition) for c in conditions):
            raise PidrtError("one batch runs one identity method; got folded SCA/IP-Adapter identities with others")
        present = [c for c in conditions if c is not None]
        if len({(c.method, c.query) for c in present}) > 1:
            raise PidrtError("one batch runs one identity method; got both SCA and IP-Adapter identities")
        payloads = {}
        for name in present[0].cond:
            per_element = [None if c is None else getattr(c, h)[name] for c, h in zip(conditions, halves)]
            try:
                branch = stack_folded(per_element)
            except ValueError as exc:
                raise PidrtError(str(exc)) from None
            payloads[name] = FoldedLayer(present[0].query, branch.to(self.device, self.dtype))
        return payloads

"""The baseline: diffusers' eager `StableDiffusionPipeline` on the very modules pidrt runs.

Built from the pipeline's own UNet, text encoder and VAE (same weights, same device and dtype)
and a `DDIMScheduler` from the same scheduler config (clip_sample off, as SD1.5's config has it).
pidrt's tokenizer is bypassed: the prompts are encoded by the shared text encoder and passed as
`prompt_embeds` / `negative_prompt_embeds`, and the starting latents are pidrt's per-seed noise,
so for `none` the two pipelines compute the same images (the harness reports the difference).

- `none`: diffusers' `AttnProcessor2_0` on every layer (the plain UNet).
- `ip`: diffusers' `IPAdapterAttnProcessor2_0` on the cross-attention layers with the adapter's
  to_k_ip / to_v_ip weights, the adapter's image projection as the UNet's `encoder_hid_proj`, and
  the identity's image embedding through `ip_adapter_image_embeds` (zeros for CFG's negative half,
  as pidrt). diffusers applies one IP scale to the whole batch: the elements that carry no
  identity in pidrt's mixed batch carry the zero embedding here, which costs the same work (the
  branch runs for every element in both) but does not give the same images.
- `sca`, `eaa`: diffusers has no implementation; their speed is compared with diffusers' plain
  UNet (`none`) and with pidrt's own `none`.

The UNet's attention processors (and `encoder_hid_proj`) are swapped in for each baseline call
and restored after it, the same processor objects, so pidrt's shared `BranchState` is untouched.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict

import torch

from pidrt.bench.flops import FirstForwardFlops
from pidrt.bench.timing import sync
from pidrt.runtime.pipeline import initial_noise

SUPPORTED = ("none", "ip")
UNSUPPORTED_REASON = {
    "sca": "diffusers has no Style Cross-Attention (PIDiff) implementation",
    "eaa": "diffusers has no Embedded Attention Adapter (Inv-Adapter) implementation",
}


def baseline_reason(method: str, identities) -> str | None:
    """None when the baseline can run `method`, else why not."""
    if method in UNSUPPORTED_REASON:
        return UNSUPPORTED_REASON[method]
    if method == "ip":
        if "ip" in identities.unavailable:
            return identities.unavailable["ip"]
        if identities.ip_embeds is None:
            return identities.unavailable.get("ip_baseline", "no IP-Adapter image embeddings")
    return None


class DiffusersBaseline:
    def __init__(self, pipe, identities):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        m = pipe.models
        self.pipe, self.identities = pipe, identities
        scheduler = DDIMScheduler(**asdict(m.preset.scheduler), clip_sample=False)
        self.sd = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=None, unet=m.unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
        self.sd.set_progress_bar_config(disable=True)
        self._ip_parts = None

    @contextlib.contextmanager
    def processors(self, method: str, scale: float):
        from diffusers.models.attention_processor import (
            AttnProcessor2_0,
        )

        unet = self.pipe.models.unet
        saved = dict(unet.attn_processors)
        saved_proj, saved_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        procs = {}
        for layer in self.pipe.layers:
            key = layer.name + ".processor"
            if method == "ip" and layer.kind == "cross":
                procs[key] = self._ip_processors()[layer.name]
                procs[key].scale = [scale]
            else:
                procs[key] = AttnProcessor2_0()
        try:
            unet.set_attn_processor(procs)  # diffusers pops from the dict it is given
            if method == "ip":
                unet.encoder_hid_proj = self._ip_parts["proj"]
                unet.config.encoder_hid_dim_type = "ip_image_proj"
            yield
        finally:
            unet.set_attn_processor(dict(saved))
            unet.encoder_hid_proj = saved_proj
            unet.config.encoder_hid_dim_type = saved_type

    def _ip_processors(self) -> dict:
        if self._ip_parts is None:
            from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
            from diffusers.models.embeddings import MultiIPAdapterImageProjection

            adapter = self.identities.encoders.ip
            dim = self.pipe.models.unet.config.cross_attention_dim
            device, dtype = self.pipe.device, self.pipe.dtype
            procs = {}
            for layer in self.pipe.layers:
                if layer.kind != "cross":
                    continue
                proc = IPAdapterAttnProcessor2_0(layer.channels, dim, num_tokens=(adapter.n_tokens,), scale=1.0)
                with torch.no_grad():
                    proc.to_k_ip[0].weight.copy_(adapter.layers[layer.index]["to_k_ip.weight"])
                    proc.to_v_ip[0].weight.copy_(adapter.layers[layer.index]["to_v_ip.weight"])
                procs[layer.name] = proc.to(device, dtype).eval().requires_grad_(False)
            proj = copy.deepcopy(adapter.image_proj).to(device, dtype).eval().requires_grad_(False)
            self._ip_parts = {"procs": procs, "proj": MultiIPAdapterImageProjection([proj])}
        return self._ip_parts["procs"]

    def _ip_embeds(self, specs) -> list[torch.Tensor]:
        embeds = self.identities.ip_embeds
        conditions = self.identities.conditions["ip"]
        rows = []
        for spec in specs:
            which = next((i for i, c in enumerate(conditions) if c is spec.condition), None)
            rows.append(embeds[which] if which is not None else torch.zeros_like(embeds[0]))
        positive = torch.stack(rows)
        both = torch.cat([torch.zeros_like(positive), positive])[:, None]  # [2B, 1, D]: CFG negative first
        return [both.to(self.pipe.device, self.pipe.dtype)]

    def generate(self, method: str, sampling, specs, scale: float, count_flops: bool = False) -> tuple[torch.Tensor, dict]:
        """Images [B, 3, H, W] and stage seconds (text_encode_s, unet_loop_s, vae_decode_s, total_s)."""
        pipe, device = self.pipe, self.pipe.device
        batch = len(specs)
        timings: dict = {}
        counter = None
        with self.processors(method, scale):
            sync(device)
            start = time.perf_counter()
            ctx = pipe.encode_text([s.negative_prompt for s in specs] + [s.prompt for s in specs])
            sync(device)
            timings["text_encode_s"] = time.perf_counter() - start
            scale_f = pipe.models.preset.latent_scale
            shape = (pipe.models.preset.vae.latent_channels, sampling.height // scale_f, sampling.width // scale_f)
            latents = initial_noise([s.seed for s in specs], shape, pipe.dtype, device)
            kwargs = {}
            if method == "ip":
                kwargs["ip_adapter_image_embeds"] = self._ip_embeds(specs)
            marks = {}

            def on_step_end(sd, i, t, tensors):
                if i == sampling.steps - 1:
                    sync(device)
                    marks["loop_end"] = time.perf_counter()
                return tensors

            if count_flops:
                counter = FirstForwardFlops(pipe.models.unet)
            try:
                call_start = time.perf_counter()
                out = self.sd(prompt_embeds=ctx[batch:], negative_prompt_embeds=ctx[:batch], latents=latents,
                              num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                              height=sampling.height, width=sampling.width, output_type="pt",
                              callback_on_step_end=on_step_end, **kwargs)
                sync(device)
                end = time.perf_counter()
            finally:
                if counter is not None:
                    counter.remove()
        timings["unet_loop_s"] = marks["loop_end"] - call_start
        timings["vae_decode_s"] = end - marks["loop_end"]
        timings["total_s"] = end - start
        if counter is not None:
            timings["_unet_call_flops"], timings["_unet_batch"] = counter.flops, counter.batch
        return out.images.float(), timings

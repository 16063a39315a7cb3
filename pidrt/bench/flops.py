"""Flop counts of the models, measured with `torch.utils.flop_counter.FlopCounterMode` on one call.

Counted, not quoted: the UNet call of each method variant and batch size exactly as the pipeline
issues it (CFG doubles the batch; EAA recompute adds its reference rows; identity branches add
their matmuls), the text encoder call(s) before the loop, and the VAE decoder on the batch's
latents. FlopCounterMode counts matrix multiplies, convolutions and attention (2 flops per
multiply-add); elementwise work (norms, activations, the scheduler) is not counted. A
generation's count is text + steps x UNet call + VAE decode.

torch registers attention formulas for the CUDA SDPA kernels only; the CPU flash-attention op is
added here with the same formula, so CPU and GPU counts agree.
"""

from __future__ import annotations

import torch

from pidrt.bench.timing import sync


class _Stop(Exception):
    """Raised out of `generate` after its first UNet call: the rest of the loop is not needed."""


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        custom[cpu_sdpa] = cpu_flash
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_generation(pipe, sampling, specs) -> dict:
    """Flops of one generation of `specs` on the torch reference `pipe` (first UNet call x steps)."""
    counts = {"text_encoder": 0, "unet_call": None, "unet_batch": None}
    encode, unet = pipe.encode_text, pipe.unet

    def encode_text(prompts):
        with flop_counter() as fc:
            out = encode(prompts)
        counts["text_encoder"] += fc.get_total_flops()
        return out

    def unet_call(x, t, ctx):
        with flop_counter() as fc:
            unet(x, t, ctx)
        counts["unet_call"], counts["unet_batch"] = fc.get_total_flops(), int(x.shape[0])
        raise _Stop

    pipe.encode_text, pipe.unet = encode_text, unet_call
    try:
        pipe.generate(sampling, specs)
    except _Stop:
        pass
    finally:
        pipe.__dict__.pop("encode_text", None)
        pipe.__dict__.pop("unet", None)
        pipe.state.clear()
    scale = pipe.models.preset.latent_scale
    latents = torch.zeros(len(specs), pipe.models.unet.config.in_channels, sampling.height // scale,
                          sampling.width // scale, device=pipe.device, dtype=pipe.dtype)
    with flop_counter() as fc:
        pipe.decode(latents)
    sync(pipe.device)
    counts["vae_decoder"] = fc.get_total_flops()
    counts["generation"] = counts["text_encoder"] + sampling.steps * counts["unet_call"] + counts["vae_decoder"]
    return counts


class FirstForwardFlops:
    """Flops of a module's first forward while attached (hooks enter and leave FlopCounterMode)."""

    def __init__(self, module: torch.nn.Module):
        self.flops: int | None = None
        self.batch: int | None = None
        self._mode = None
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        if self.flops is None and self._mode is None:
            self._mode = flop_counter()
            self._mode.__enter__()
            sample = args[0] if args else kwargs.get("sample")
            self.batch = int(sample.shape[0]) if sample is not None else None

    def _post(self, *_):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops, self._mode = self._mode.get_total_flops(), None

    def remove(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for h in self._handles:
            h.remove()

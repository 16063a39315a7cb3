"""Every kernel variant pidrt launches for a preset, compiled ahead of time with ptxas's resource report.

Two forms of each kernel run on a GPU, and Triton compiles each distinct specialisation apart:

- ``plugin``: the launch plans TensorRT's ahead-of-time plugins embed (`pidrt.kernels.aot.Launch`):
  few-token per padded score tile (tokens per head 1..16), dual-KV per head dim, in the dtypes
  the plugins take (fp16, fp32).
- ``jit``: what pidrt's own launchers hand Triton's JIT at the preset's shapes (batch 2 for CFG,
  the preset's resolution, a GPU with `SMS` SMs) and the JIT's specialisations of the argument
  values (`JitCall`): few-token with the score-bias pointer `TritonOps` passes, dual-KV for self
  and cross attention, and the fused GroupNorm's statistics and apply kernels for every norm the
  fast backend fuses (with and without the time-embedding shift, with and without SiLU), in
  fp16, bf16 and fp32. Calls that specialise alike are compiled once.

Compiling them for a GPU architecture needs no GPU, so CPU CI proves they build for Hopper and
that none spills registers or needs more shared memory than its launch gets; `pidrt kernels`
writes the PTX and a table of registers, spills and shared memory.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pidrt.errors import PidrtError
from pidrt.models.presets import Preset

FEW_TOKEN_COUNTS = (1, 2, 4, 8, 16)  # one per padded width NP; every n in 1..16 maps to one of them
SAMPLE_TOKENS = 4096  # a 512 px latent; the token count is a runtime value, it does not change the code
JIT_TOKENS = 4  # tokens per head of the shipped SCA and IP-Adapter adapters
JIT_BATCH = 2  # a CFG pair
SMS = 132  # H100 / H200: the launchers size their grids by the SM count
# Dynamic shared memory a launch may use on sm_90: a plain cuLaunchKernel (TensorRT's AOT plugins)
# gets 48 KiB; Triton's launcher opts a kernel in to up to 227 KiB.
SHARED_LIMIT = {"plugin": 48 * 1024, "jit": 227 * 1024}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Variant:
    kernel: str  # "few_token" | "dual_kv" | "group_norm_stats" | "group_norm_apply"
    form: str  # "plugin" | "jit"
    label: str
    dtypes: tuple[torch.dtype, ...]  # the dtypes this launch runs in
    build: Callable[[torch.dtype], object] = field(compare=False, repr=False)  # dtype -> Launch | JitCall

    def launch(self, dtype: torch.dtype):
        if dtype not in self.dtypes:
            raise PidrtError(f"{self.form} {self.label} does not run in {dtype}")
        return self.build(dtype)


@dataclass(frozen=True)
class Resources:
    variant: str
    form: str
    arch: int
    dtype: str
    num_warps: int
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    ptx_bytes: int
    ptx_isa: str  # the PTX's .version: what a driver loading it must support

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def fits(self) -> bool:
        """No spills, and within the shared memory its launch gets."""
        return not self.spill_store_bytes and not self.spill_load_bytes and self.shared_bytes <= SHARED_LIMIT[self.form]


def variants(preset: Preset) -> list[Variant]:
    """The plugin plans, then the JIT launches, of `preset`'s UNet."""
    return plugin_variants(preset) + _jit_variants(preset)


def plugin_variants(preset: Preset) -> list[Variant]:
    """Few-token (smallest level's width: only the tile shape matters) and one dual-KV per head dim."""
    from pidrt.kernels import dual_kv, few_token

    u = preset.unet
    widths = sorted(set(u.block_out_channels))
    found = [Variant("few_token", "plugin", f"few_token n={n}", (F16, F32),
                     functools.partial(few_token.plugin_launch, 2, SAMPLE_TOKENS, widths[0], widths[0], u.heads, n))
             for n in FEW_TOKEN_COUNTS]
    for c in widths:
        d = c // u.heads
        found.append(Variant("dual_kv", "plugin", f"dual_kv d={d}", dual_kv.plugin_dtypes(d),
                             functools.partial(dual_kv.plugin_launch, 2, SAMPLE_TOKENS, SAMPLE_TOKENS, 256, u.heads, d)))
    return found


def _jit_variants(preset: Preset) -> list[Variant]:
    from pidrt.kernels import dual_kv, few_token, group_norm
    from pidrt.models.adapters import layer_tokens
    from pidrt.models.folded import FoldedBranch

    e = lambda *shape, dtype=F32: torch.empty(*shape, dtype=dtype)  # noqa: E731 - never read, only specialised
    b = JIT_BATCH
    latent = preset.resolution // preset.latent_scale
    layers, norms = _unet_shapes(preset)
    levels = len(preset.unet.block_out_channels)
    found: dict[tuple, Variant] = {}

    def add(kernel: str, label: str, build) -> None:
        for dtype in (F16, BF16, F32):  # fp32 has tiles of its own, so its calls may specialise apart
            call = build(dtype)
            signature, constants, divisible = call.specialisation()
            key = (kernel, call.num_warps, call.num_stages, tuple(signature.items()),
                   repr(sorted(constants.items())), divisible)
            if key not in found:
                found[key] = Variant(kernel, "jit", label, (dtype,), build)

    for layer in layers:
        n, c, d = layer_tokens(layer.name, latent, levels), layer.channels, layer.channels // layer.heads
        m1 = n if layer.kind == "self" else 77
        m2 = n if layer.kind == "self" else 256
        add("dual_kv", f"dual_kv {layer.kind} d={d} N={n}",
            lambda dt, n=n, c=c, h=layer.heads, m1=m1, m2=m2: dual_kv.jit_call(
                *(e(b, t, c, dtype=dt).view(b, t, h, -1).transpose(1, 2) for t in (n, m1, m1, m2, m2)),
                e(b, dtype=dt), e(b, n, h, c // h, dtype=dt).transpose(1, 2)))
        if layer.kind == "cross":
            hn = layer.heads * JIT_TOKENS
            add("few_token", f"few_token n={JIT_TOKENS} C={c} N={n}",
                lambda dt, n=n, c=c, hn=hn: few_token.jit_call(
                    e(b, n, c, dtype=dt), e(b, n, c, dtype=dt),
                    FoldedBranch(e(b, c, hn, dtype=dt), e(b, hn, c, dtype=dt), e(b, hn, dtype=dt), e(b, c, dtype=dt),
                                 JIT_TOKENS), e(b, dtype=dt), e(b, n, c, dtype=dt), SMS))
    for (c, h, w, groups, shift, silu) in norms:
        def calls(dt, c=c, h=h, w=w, groups=groups, shift=shift, silu=silu):
            x = e(b, c, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)  # the fast backend's layout
            return group_norm.jit_calls(x, e(c, dtype=dt), e(c, dtype=dt), groups, 1e-5,
                                        e(b, c, dtype=dt) if shift else None, silu, torch.empty_like(x), SMS)
        what = f"C={c} HW={h * w}{' +shift' if shift else ''}{' +SiLU' if silu else ''}"
        add("group_norm_stats", f"group_norm stats {what}", lambda dt, calls=calls: calls(dt)[0])
        add("group_norm_apply", f"group_norm apply {what}", lambda dt, calls=calls: calls(dt)[1])
    return list(found.values())


@functools.lru_cache(maxsize=2)
def _unet_shapes(preset: Preset):
    """(attention layers, {(C, H, W, groups, shift?, SiLU?)} of the norms the fast backend fuses) at the
    preset's resolution, from the diffusers UNet built on the meta device (no weights, no compute)."""
    from diffusers import UNet2DConditionModel

    from pidrt.engines.fused_norms import FusedGroupNorm, fuse_group_norms
    from pidrt.models.attention import attention_layers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet.diffusers_kwargs()).eval()
    layers = attention_layers(unet)
    fuse_group_norms(unet)
    norms: dict[tuple, None] = {}
    for module in unet.modules():
        if isinstance(module, FusedGroupNorm):
            def record(x, shift=None, module=module):
                norms[(x.shape[1], x.shape[2], x.shape[3], module.num_groups, shift is not None, module.silu)] = None
                return x  # shapes are all the meta forward needs

            module.forward = record
    latent = preset.resolution // preset.latent_scale
    meta = lambda *s: torch.zeros(*s, device="meta")  # noqa: E731
    with torch.no_grad():
        unet(meta(JIT_BATCH, preset.unet.in_channels, latent, latent), meta(JIT_BATCH),
             meta(JIT_BATCH, 77, preset.unet.cross_attention_dim))
    return layers, list(norms)


def report_meta(preset: str, arch: int) -> dict:
    """What a resource report was measured with: the limits hold for this Triton and its ptxas."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    from pidrt.kernels import sources_fingerprint

    return {"preset": preset, "arch": arch, "triton": triton.__version__, "ptxas": get_ptxas(arch).version,
            "kernel_sources": sources_fingerprint(),
            "jit_launches": {"batch": JIT_BATCH, "sms": SMS, "few_token_tokens": JIT_TOKENS},
            "shared_limit": SHARED_LIMIT}


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes ptxas reports for the PTX (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([tool.path, f"-arch={target}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode:
        raise PidrtError(f"ptxas failed for {target}: {text.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise PidrtError(f"could not read ptxas's resource report:\n{text}")
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2))}


def compile_variant(variant: Variant, arch: int, dtype: torch.dtype, out_dir: Path | None = None,
                    max_ptx_version: int | None = None) -> Resources:
    from pidrt.kernels.aot import TRITON_TYPES

    compiled = variant.launch(dtype).compile(arch, max_ptx_version=max_ptx_version)
    usage = ptxas_report(compiled.ptx, arch)
    if out_dir is not None:
        from pidrt.fileio import atomic_write

        stem = re.sub(r"[^A-Za-z0-9_.+-]", "", variant.label.replace(" ", "_").replace("=", ""))
        atomic_write(Path(out_dir) / f"{variant.form}.{stem}.sm{arch}.{TRITON_TYPES[dtype]}.ptx", compiled.ptx.encode())
    return Resources(variant.label, variant.form, arch, TRITON_TYPES[dtype], compiled.num_warps, compiled.shared_bytes,
                     ptx_bytes=len(compiled.ptx), ptx_isa=compiled.ptx_isa, **usage)


def markdown(rows: list[Resources], title: str) -> str:
    lines = [f"# {title}", "",
             ("| form | kernel variant | arch | dtype | warps | registers/thread | spill stores (B) | spill loads (B) "
              "| shared (B) | PTX ISA |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.form} | {r.variant} | sm_{r.arch} | {r.dtype} | {r.num_warps} | {r.registers} | "
                     f"{r.spill_store_bytes} | {r.spill_load_bytes} | {r.shared_bytes} | {r.ptx_isa} |")
    return "\n".join(lines) + "\n"

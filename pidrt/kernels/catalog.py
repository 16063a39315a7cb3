"""Every kernel variant a preset's UNet launches, compiled ahead of time with ptxas's resource report.

A variant is what Triton compiles separately: for the few-token kernel the padded score tile
(set by the tokens per head, 1..16), for the dual-KV kernel the head dim. Compiling them all for a
GPU architecture needs no GPU, so CPU CI proves they build for Hopper and that none spills
registers, and `pidrt kernels` writes the PTX and a table of registers, spills and shared memory.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pidrt.errors import PidrtError
from pidrt.models.presets import Preset

FEW_TOKEN_COUNTS = (1, 2, 4, 8, 16)  # one per padded width NP; every n in 1..16 maps to one of them
SAMPLE_TOKENS = 4096  # a 512 px latent; the token count is a runtime value, it does not change the code


@dataclass(frozen=True)
class Variant:
    kernel: str  # "few_token" | "dual_kv"
    label: str
    heads: int
    channels: int
    n_tokens: int = 0  # few_token only

    def launch(self, dtype: torch.dtype):
        if self.kernel == "few_token":
            from pidrt.kernels.few_token import plugin_launch

            return plugin_launch(2, SAMPLE_TOKENS, self.channels, self.channels, self.heads, self.n_tokens, dtype)
        from pidrt.kernels.dual_kv import plugin_launch

        return plugin_launch(2, SAMPLE_TOKENS, SAMPLE_TOKENS, 256, self.heads, self.channels // self.heads, dtype)


@dataclass(frozen=True)
class Resources:
    variant: str
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


def variants(preset: Preset) -> list[Variant]:
    """Few-token variants (smallest level's width: only the tile shape matters) and one dual-KV per head dim."""
    u = preset.unet
    widths = sorted(set(u.block_out_channels))
    found = [Variant("few_token", f"few_token n={n}", u.heads, widths[0], n) for n in FEW_TOKEN_COUNTS]
    for c in widths:
        d = c // u.heads
        found.append(Variant("dual_kv", f"dual_kv d={d}", u.heads, c))
    return found


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

        name = f"{variant.label.replace(' ', '_').replace('=', '')}.sm{arch}.{TRITON_TYPES[dtype]}.ptx"
        atomic_write(Path(out_dir) / name, compiled.ptx.encode())
    return Resources(variant.label, arch, TRITON_TYPES[dtype], compiled.num_warps, compiled.shared_bytes,
                     ptx_bytes=len(compiled.ptx), ptx_isa=compiled.ptx_isa, **usage)


def markdown(rows: list[Resources], title: str) -> str:
    lines = [f"# {title}", "",
             ("| kernel variant | arch | dtype | warps | registers/thread | spill stores (B) | spill loads (B) "
              "| shared (B) | PTX ISA |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | sm_{r.arch} | {r.dtype} | {r.num_warps} | {r.registers} | "
                     f"{r.spill_store_bytes} | {r.spill_load_bytes} | {r.shared_bytes} | {r.ptx_isa} |")
    return "\n".join(lines) + "\n"

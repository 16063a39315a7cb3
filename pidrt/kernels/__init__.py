"""Triton kernels for the two attention ops pidrt adds to the SD1.5 UNet.

- ``pidrt.kernels.few_token``: the folded few-token branch (SCA, IP-Adapter; methods.md sec. 2)
  fused with its scaled residual add, one launch per layer call.
- ``pidrt.kernels.dual_kv``: attention over two KV sets sharing one query (Inv-Adapter EAA;
  methods.md sec. 3), out = attn(q, k1, v1) + sigma[b] * attn(q, k2, v2), one flash-style pass.
- ``pidrt.kernels.reference``: plain-torch references for both (no Triton needed).
- ``pidrt.kernels.ops``: both behind the processors' ``FusedOps`` interface (``BranchState.fused``).
- ``pidrt.kernels.aot``: launch plans in TensorRT's plugin argument order, compiled for a named GPU
  architecture without a GPU; ``pidrt.kernels.catalog``: every variant a preset needs (`pidrt kernels`).

This package module stays import-light: it never imports triton (or torch) itself, so code that
only asks ``available()`` does not pay for, or fail on, a Triton import. The kernel modules import
triton at top level because ``@triton.jit`` needs it; import them only when kernels are used.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["available", "sources_fingerprint"]

# The modules whose source decides the compiled code of every kernel.
KERNEL_SOURCES = ("aot.py", "few_token.py", "dual_kv.py", "_common.py", "group_norm.py")


def available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why (not).

    They run when triton is importable and either a CUDA device is present or the Triton
    interpreter is switched on (TRITON_INTERPRET=1, CPU tensors; slow, for tests).
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'pidrt[kernels]')"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton importable; TRITON_INTERPRET=1 (interpreter on CPU tensors)"
    try:
        import torch
    except ImportError as exc:  # torch is a core dependency, but say so rather than crash
        return False, f"torch is not importable ({exc})"
    if torch.cuda.is_available():
        return True, f"triton importable; CUDA device {torch.cuda.get_device_name(0)!r}"
    return False, "triton is importable but there is no CUDA device and TRITON_INTERPRET is not 1"


def sources_fingerprint(names: tuple[str, ...] = KERNEL_SOURCES) -> str:
    """sha256 of these kernel modules' sources: what compiled code (an engine, a resource report) came from."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for name in names:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()

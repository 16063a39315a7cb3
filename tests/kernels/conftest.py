"""Kernel tests run in the Triton interpreter on CPU unless a CUDA device is present.

TRITON_INTERPRET must be set before any @triton.jit function is created (Triton decides at
decoration time); the root tests/conftest.py sets it for the whole session. Here: GPU-only tests
are skipped when the kernels run interpreted.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not INTERPRET:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device with compiled Triton (not the interpreter)")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:  # this hook sees the whole session: touch only this directory's tests
        if "gpu" in item.keywords and str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: CPU tensors for the interpreter, else the GPU."""
    return "cpu" if INTERPRET else "cuda"

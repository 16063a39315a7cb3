import os

import pytest
import torch

# Triton fixes interpreter mode when a kernel is decorated, i.e. when its module is first
# imported, and that can happen from any test directory: set it for the whole session, before
# any pidrt import (a GPU run keeps compiled kernels; setdefault lets TRITON_INTERPRET=0 force it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pidrt.models.build import build_random  # noqa: E402
from pidrt.models.presets import TINY  # noqa: E402
from pidrt.runtime.pipeline import Pipeline  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny models run in milliseconds; with 2+ intra-op threads on a shared CI box the
    # thread pool's spin-waits made a reference UNet call 40x slower (3.5 s instead of 0.08 s).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_pipe():
    return Pipeline(build_random(TINY, seed=0))


@pytest.fixture(scope="session")
def photos() -> tuple[bytes, bytes]:
    """A real face photo shipped in an installed package and its mirror image (two identities)."""
    from pidrt.bench.identities import face_photos
    from pidrt.errors import PidrtError

    try:
        (first, _), (mirrored, _) = face_photos()
    except PidrtError:
        pytest.skip("needs a face photo: scikit-image (astronaut) or insightface (t1.jpg)")
    return first, mirrored

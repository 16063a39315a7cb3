import pytest
import torch

from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.runtime.pipeline import Pipeline


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

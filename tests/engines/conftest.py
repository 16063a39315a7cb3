import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny models run in milliseconds; with 2+ intra-op threads on a shared CI box the
    # thread pool's spin-waits made a reference UNet call 40x slower (3.5 s instead of 0.08 s).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

import pytest

from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    return Pipeline(build_random(TINY, seed=0))

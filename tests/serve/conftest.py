"""One tiny-preset demo generator (random weights, Haar face detector) for the service tests."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pidrt.runtime.requests import Defaults, GeneratorConfig

STEPS = 2


def small_config(**kw) -> GeneratorConfig:
    kw.setdefault("defaults", Defaults(steps=STEPS, guidance=5.0))
    kw.setdefault("enroll_detector", "haar")
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_wait_ms", 20)
    return GeneratorConfig(**kw)


@pytest.fixture(scope="session")
def generator(tmp_path_factory):
    from pidrt.serve.factory import build_generator

    gen = build_generator(tmp_path_factory.mktemp("serve-store"), config=small_config(queue_size=16))
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def app(generator):
    from pidrt.serve.app import create_app

    return create_app(generator)


@pytest.fixture(scope="session")
def identities(generator, photos):
    return [generator.enroll([p], "ip").identity_id for p in photos]


def run(app, fn):
    """Run `await fn(client)` against `app` in a fresh event loop."""

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://pidrt.test",
                                     timeout=120) as client:
            return await fn(client)

    return asyncio.run(main())


@pytest.fixture(scope="session")
def call():
    """call(app, fn): `await fn(client)` with an httpx client on `app`, in a fresh event loop."""
    return run


@pytest.fixture(scope="session")
def make_config():
    """make_config(**overrides) -> the tests' small GeneratorConfig."""
    return small_config

"""The generator every server builds: real weights when given, else a preset's random weights.

Shared by `pidrt serve --preset tiny`, the service tests, the load benchmark and the Ray Serve
replicas, so all of them run the same thing with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import GeneratorConfig
from pidrt.runtime.setup import RuntimeOptions


def build_generator(store_dir: str | Path, runtime: RuntimeOptions | None = None,
                    config: GeneratorConfig | None = None) -> Generator:
    """A running Generator over `runtime` (default: tiny, random weights) and an identity store at `store_dir`."""
    from pidrt.identity.enroll import Enroller
    from pidrt.identity.store import IdentityStore
    from pidrt.runtime.setup import build_runtime

    store = IdentityStore(Path(store_dir))  # a bad store path fails before the models load
    pipe, encoders = build_runtime(runtime or RuntimeOptions())
    config = config or GeneratorConfig()
    device_cache = None
    if config.identity_device_mib:
        from pidrt.identity.device_cache import DeviceCache

        device_cache = DeviceCache(config.identity_device_mib << 20, pipe.device)
    enroller = Enroller(pipe, store, encoders, device_cache)
    return Generator(pipe, enroller, config, backend="torch")

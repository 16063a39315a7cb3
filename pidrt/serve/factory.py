"""The generator every entry point builds: models, the chosen backend, the identity store.

Shared by `pidrt serve`, `pidrt generate`, the service tests, the load benchmark and the Ray
Serve replicas, so all of them run the same thing. Without `--model` the preset's random weights
are used (nothing downloaded); the backend comes from `BackendOptions` through
`pidrt.engines.choose.open_backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pidrt.engines.options import BackendOptions
from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import GeneratorConfig
from pidrt.runtime.setup import RuntimeOptions


def build_generator(store_dir: str | Path, runtime: RuntimeOptions | None = None,
                    config: GeneratorConfig | None = None, backend: BackendOptions | None = None, *,
                    on_stage: Callable[[str], None] | None = None, progress: bool = True,
                    capturer=None) -> Generator:
    """A running Generator over `runtime` (default: tiny, random weights) on `backend` (default:
    auto), with an identity store at `store_dir`. Returns once every bucket is warm.

    on_stage(text) hears what start-up is doing (a server's /readyz shows it); capturer is the
    fast backend's graph capturer (tests inject `pidrt.engines.cuda_graphs.EagerCapturer`).
    """
    from pidrt.engines.choose import open_backend, preflight
    from pidrt.engines.options import OffBucketLog
    from pidrt.identity.enroll import Enroller
    from pidrt.identity.store import IdentityStore
    from pidrt.runtime.setup import build_runtime

    runtime, config, backend = runtime or RuntimeOptions(), config or GeneratorConfig(), backend or BackendOptions()
    stage = on_stage or (lambda text: None)
    preflight(backend, runtime.device)  # before the models load: a backend that cannot run fails now
    store = IdentityStore(Path(store_dir))  # and so does a bad store path
    stage("loading the models")
    pipe, encoders = build_runtime(runtime)
    opened = open_backend(backend, pipe, encoders, max_batch=config.max_batch, capturer=capturer, on_stage=stage,
                          progress=progress)
    del pipe  # the reference models are kept only if the backend runs them
    device_cache = None
    if config.identity_device_mib:
        from pidrt.identity.device_cache import DeviceCache

        device_cache = DeviceCache(config.identity_device_mib << 20, opened.pipeline.device)
    enroller = Enroller(opened.pipeline, store, encoders, device_cache,
                        base_fp=opened.base_fingerprint)
    generator = Generator(opened.pipeline, enroller, config, backend=opened.name, admit=opened.admit,
                          report=opened.report)
    if opened.buckets is not None:
        generator.add_observer(OffBucketLog(opened.buckets, opened.name))
    return generator

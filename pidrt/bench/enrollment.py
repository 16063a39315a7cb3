"""Enrollment costs: cache miss (the artifact is built) and cache hit (read back), with stages.

SCA: face detection + FFHQ alignment, e4e, the mapping network F(w) / F(0), folding into A/B.
IP-Adapter: face crop, CLIP image encoder (or ArcFace), image projection, folding.
EAA: face crop, VAE encode, DDIM inversion, the reconstruction pass that records every layer's
input, projection of the recordings into per-step K/V. EAA is measured per resolution and step
count (its cost is linear in steps and grows with the latent size); SCA/IP depend on neither.

Stages are timed by wrapping the functions `Enroller` calls for the duration of a measurement
(synchronised on CUDA); what is left ("other") is key hashing, serialisation and the store's
atomic write. A miss deletes the entry first; a hit enrolls the same photo again.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from pidrt.bench.identities import encoders_for_resolution, face_photos
from pidrt.bench.timing import summarize, sync
from pidrt.errors import PidrtError
from pidrt.identity.enroll import Encoders, Enroller, EnrollOptions
from pidrt.identity.store import IdentityStore

STAGES = {
    "sca": ("face_detect_align", "e4e", "mapping", "fold", "other"),
    "ip": ("face_detect_align", "image_encoder", "image_proj", "fold", "other"),
    "eaa": ("face_detect_align", "vae_encode", "ddim_inversion", "reconstruction_recording", "kv_projection", "other"),
}


class StageTimer:
    """Seconds per named stage while active; wrappers are removed on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []
        self._depth = 0

    def _wrap(self, fn: Callable, stage: str) -> Callable:
        def wrapper(*args, **kwargs):
            if self._depth:  # nested in another timed stage: counted there
                return fn(*args, **kwargs)
            self._depth += 1
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[stage] += time.perf_counter() - start
                self._depth -= 1
        return wrapper

    def patch(self, owner, name: str, stage: str) -> None:
        """Replace owner.name (a module function or an instance method) by a timed wrapper."""
        if owner is None or not hasattr(owner, name):
            return
        had_own = name in getattr(owner, "__dict__", {})
        old = getattr(owner, name)
        setattr(owner, name, self._wrap(old, stage))
        self._undo.append(lambda: setattr(owner, name, old) if had_own else delattr(owner, name))

    def hook(self, module: torch.nn.Module | None, stage: str) -> None:
        """Time every forward of an nn.Module (calls are not methods one can rebind on the instance)."""
        if module is None:
            return
        starts = []

        def pre(*_):
            if self._depth:
                starts.append(None)
                return
            self._depth += 1
            sync(self.device)
            starts.append(time.perf_counter())

        def post(*_):
            start = starts.pop()
            if start is None:
                return
            sync(self.device)
            self.seconds[stage] += time.perf_counter() - start
            self._depth -= 1

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def patch_inversion(self, enroll_module) -> None:
        """Split invert_and_record at its T-th UNet call: inversion, then reconstruction + recording."""
        if not hasattr(enroll_module, "invert_and_record"):
            return
        original = enroll_module.invert_and_record
        timer = self

        def invert_and_record(pipe, latents, caption, steps, record_from="reconstruction", on_call=None):
            marks = []

            def call():
                sync(timer.device)
                marks.append(time.perf_counter())
                if on_call is not None:
                    on_call()

            sync(timer.device)
            start = time.perf_counter()
            timer._depth += 1
            try:
                result = original(pipe, latents, caption, steps, record_from, on_call=call)
            finally:
                timer._depth -= 1
            sync(timer.device)
            end = time.perf_counter()
            if record_from == "reconstruction" and len(marks) >= steps:
                timer.seconds["ddim_inversion"] += marks[steps - 1] - start
                timer.seconds["reconstruction_recording"] += end - marks[steps - 1]
            else:
                timer.seconds["ddim_inversion"] += end - start  # recorded during the inversion itself
            return result

        enroll_module.invert_and_record = invert_and_record
        self._undo.append(lambda: setattr(enroll_module, "invert_and_record", original))

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def instrumented(enroller: Enroller, method: str):
    import pidrt.identity.enroll as enroll_module
    from pidrt.identity import faces

    timer = StageTimer(enroller.pipe.device)
    enc: Encoders = enroller.encoders
    try:
        timer.patch(faces, "load_image", "face_detect_align")
        timer.patch(faces, "detect_faces", "face_detect_align")
        timer.patch(faces, "preprocess", "face_detect_align")
        timer.patch(enroll_module, "few_token_payloads", "fold")
        if method == "sca":
            timer.patch(enc.e4e, "encode", "e4e")
            timer.hook(getattr(enc.sca, "mapping", None), "mapping")
        elif method == "ip":
            timer.patch(enc.image_encoder, "embed", "image_encoder")
            timer.patch(faces, "arcface_embedding", "image_encoder")
            timer.hook(getattr(enc.ip, "image_proj", None), "image_proj")
        else:
            timer.patch(enroller.pipe, "encode_image", "vae_encode")
            timer.patch_inversion(enroll_module)
            timer.patch(enroll_module, "eaa_features", "kv_projection")
        yield timer
    finally:
        timer.close()


def _enroll(enroller: Enroller, photo: bytes, opts: EnrollOptions, device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    result = enroller.enroll([photo], opts)
    sync(device)
    return result, time.perf_counter() - start


def grid(method: str, resolutions, steps) -> list[tuple[int | None, int | None]]:
    if method != "eaa":
        return [(None, None)]
    return [(r, s) for r in resolutions for s in steps]


def bench_enrollment(pipe, encoders: Encoders, methods, resolutions, steps, iterations: int, warmup: int,
                     seed: int, progress=None, store_dir: Path | None = None) -> dict:
    """{"base_fingerprint_s", "points": [...], "skipped": [...]} (see docs/benchmarking.md)."""
    root = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="pidrt-bench-enroll-"))
    enroller = Enroller(pipe, IdentityStore(root), encoders)
    start = time.perf_counter()
    enroller.base_fingerprint()  # hashed once per Enroller; reported apart from per-enrollment costs
    out: dict = {"base_fingerprint_s": time.perf_counter() - start, "points": [], "skipped": []}
    try:
        photo = face_photos()[0][0]
    except PidrtError as exc:
        out["skipped"] = [{"method": m, "resolution": r, "steps": s, "reason": str(exc)}
                          for m in methods for r, s in grid(m, resolutions, steps)]
        if progress is not None:
            progress.update(len(out["skipped"]))
        return out
    device = pipe.device
    for method in methods:
        for resolution, n_steps in grid(method, resolutions, steps):
            where = {"method": method, "resolution": resolution, "steps": n_steps}
            if progress is not None:
                progress.set_postfix_str(f"enroll {method} {resolution or ''} {n_steps or ''}".strip())
            try:
                enroller.encoders = (encoders_for_resolution(pipe, encoders, resolution, seed)
                                     if resolution else encoders)
                opts = EnrollOptions(method, steps=n_steps or 50, resolution=resolution)
                out["points"].append(where | _measure(enroller, photo, opts, iterations, warmup, device))
            except PidrtError as exc:
                out["skipped"].append(where | {"reason": str(exc)})
            if progress is not None:
                progress.update(1)
    enroller.encoders = encoders
    return out


def _measure(enroller: Enroller, photo: bytes, opts: EnrollOptions, iterations: int, warmup: int, device) -> dict:
    for _ in range(warmup):
        result, _ = _enroll(enroller, photo, opts, device)
        enroller.store.delete(result.identity_id)
    misses, stages = [], []
    result = None
    for i in range(iterations):
        with instrumented(enroller, opts.method) as timer:
            result, seconds = _enroll(enroller, photo, opts, device)
        if not result.created:
            raise PidrtError(f"{opts.method}: expected a cache miss, the entry was already there")
        misses.append(seconds)
        parts = {k: timer.seconds.get(k, 0.0) for k in STAGES[opts.method] if k != "other"}
        parts["other"] = max(seconds - sum(parts.values()), 0.0)
        stages.append(parts)
        if i < iterations - 1:
            enroller.store.delete(result.identity_id)
    hits = []
    for _ in range(iterations):
        again, seconds = _enroll(enroller, photo, opts, device)
        if again.created:
            raise PidrtError(f"{opts.method}: expected a cache hit, the entry was rebuilt")
        hits.append(seconds)
    size = enroller.store.path(result.identity_id).stat().st_size
    enroller.store.delete(result.identity_id)
    stage_summary = {k: summarize([s[k] for s in stages]) for k in stages[0]}
    miss = summarize(misses)
    hit = summarize(hits)
    return {"miss_s": miss, "hit_s": hit, "stages_s": stage_summary, "artifact_bytes": size,
            "hit_speedup": miss["median"] / hit["median"] if hit["median"] > 0 else None}

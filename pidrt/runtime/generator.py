"""`Generator`: requests in, images + per-image metadata out, with dynamic batching.

It owns one pipeline (the runners of one backend and the scheduler), an LRU of text embeddings,
an LRU of identity conditions and the identity store / enroller, and runs every generation on a
single worker thread. The API is thread-safe and asyncio-friendly and needs no server:

    gen = Generator(pipe, enroller, GeneratorConfig(max_batch=8))
    result = gen.generate(GenerationRequest("a photo", identity="ip-0123456789abcdef", seed=7))
    result.images[0].data      # PNG bytes; .seed, .identity, .method, .backend, .pixels
    job = gen.submit(request)  # non-blocking: job.result(), await job.wait(), job.stream(), job.cancel()

Batching (`pidrt.runtime.batching`): requests with the same size, steps, scheduler and guidance
and a compatible identity method (one method a batch; no identity joins any batch) share UNet
calls, up to `max_batch` images, waiting at most `max_wait_ms` for company. Each image's noise
is drawn from its own seed, so a seed gives the same image whatever else is in its batch up to
floating-point tolerance: bit for bit in a batch of the same composition, and within about 1e-4
(at most 1/255 after 8-bit rounding) in another one, because BLAS takes other paths for other
batch sizes. A full queue raises `Overloaded` (with a retry-after hint), a request past
its timeout fails with `GenerationTimeout`.

Cancellation: a queued request is removed from the queue. A running request finishes at once as
cancelled (its listeners get `cancelled`, its waiters `Cancelled`), but its rows keep being
computed and are dropped at the end when it shares the batch with live requests, so the others
are not disturbed; the batch stops between two steps only when every request in it is cancelled
or timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.runtime.batching import BatchQueue, Entry, QueueClosed, QueueFull
from pidrt.runtime.edit_requests import check_variant
from pidrt.models.conditions import EAACondition, ScaleSchedule
from pidrt.runtime.encoding import encode_image
from pidrt.runtime.jobs import Job
from pidrt.runtime.retouch_serving import RetouchServing, image_extras
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.requests import (
    METHODS,
    BatchInfo,
    Event,
    GeneratedImage,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    GeneratorClosed,
    GeneratorConfig,
    InvalidRequest,
    Overloaded,
    ResolvedRequest,
    method_scales,
    resolve_request,
)
from pidrt.runtime.text_cache import TextEmbeddingCache
from pidrt.runtime.token_requests import admit_tokens, enroll_tokens

log = logging.getLogger(__name__)

@dataclass
class _Identity:
    condition: Any
    method: str
    steps: int | None = None  # EAA: the step count its features were recorded for
    resolution: int | None = None  # EAA: the image side they were recorded at


class _Stop(Exception):
    """Raised from on_step when no live request is left in the batch."""


# -------------------------------------------------------------------------------- generator
class Generator:
    """See the module docstring. `pipe` needs `generate(config, specs, on_step)`, `encode_text`,
    `models.preset`; `enroller` (optional) gives identities; `backend` names the runners;
    `admit(resolved request)` refuses what the backend was not prepared for (its shape buckets);
    `report()` describes the backend in `stats()` (engine cache, warm-up)."""

    def __init__(self, pipe, enroller=None, config: GeneratorConfig | None = None, backend: str | None = None,
                 admit: Callable[[ResolvedRequest], None] | None = None, report: Callable[[], dict] | None = None):
        self.pipe, self.enroller, self._admit, self._report = pipe, enroller, admit, report
        self.store = getattr(enroller, "store", None)
        self.config = config or GeneratorConfig()
        self.backend = backend or str(getattr(pipe, "backend", "torch"))
        self.preset = pipe.models.preset
        self.scales = method_scales(getattr(enroller, "encoders", None))  # default identity scale per method
        self.text_cache = TextEmbeddingCache(pipe.encode_text, self.config.text_cache_size)
        self._identities: OrderedDict[str, _Identity] = OrderedDict()
        self._id_lock = threading.Lock()
        self._id_stats = Counter()
        self._queue = BatchQueue(self.config.max_batch, self.config.max_wait_ms / 1000, self.config.queue_size)
        self._pipe_lock = threading.Lock()  # generation and EAA enrollment both drive the UNet's state
        self._jobs_lock = threading.Lock()
        self._running: list[Job] = []
        self._batch_ids = itertools.count(1)
        self._batch_sizes: Counter[int] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._images = 0
        self._batch_seconds = 1.0  # moving average, for the retry-after hint
        self._observers: list[Any] = []
        self._post = ThreadPoolExecutor(self.config.encode_workers, thread_name_prefix="pidrt-encode")
        self._closed = False
        self.retouch = RetouchServing(pipe, self.store)  # mode "retouch": cached reference paths
        self._worker = threading.Thread(target=self._loop, name="pidrt-generator", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return not self._closed and self._worker.is_alive()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, fail the queued ones (GeneratorClosed), finish the running batch."""
        if self._closed:
            return
        self._closed = True
        for entry in self._queue.close():
            entry.item.cancel_with(GeneratorClosed("the generator is shutting down"))
        self._worker.join(timeout)
        self._post.shutdown(wait=True)

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_observer(self, observer: Any) -> None:
        """Hooks, each optional: on_batch(BatchInfo, jobs), on_job_done(Job), on_rejected(error)."""
        self._observers.append(observer)

    def _notify(self, hook: str, *args) -> None:
        for obs in self._observers:
            fn = getattr(obs, hook, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception:
                    log.exception("generator observer %s failed", hook)

    # ------------------------------------------------------------------ identities
    def _require_store(self):
        if self.enroller is None:
            raise InvalidRequest("this generator has no identity store")
        return self.enroller

    def identity(self, identity_id: str) -> _Identity:
        """The (cached) condition of a stored identity; UnknownIdentityError if there is none."""
        with self._id_lock:
            hit = self._identities.get(identity_id)
        # A stat per request: an entry deleted by another process (a Ray replica) stops working here too.
        if hit is not None and self.store is not None and identity_id not in self.store:
            self.forget(identity_id)
            hit = None
        if hit is not None:
            with self._id_lock:
                if identity_id in self._identities:
                    self._identities.move_to_end(identity_id)
                self._id_stats["hits"] += 1
            return hit
        enroller = self._require_store()
        condition = enroller.condition(identity_id)  # validates the id, reads and verifies the entry
        method = identity_id.split("-", 1)[0]
        ident = _Identity(condition, method)
        if isinstance(condition, EAACondition):
            ident.steps = len(condition.steps)
            # Header only: enroller.condition has just read and verified the whole entry.
            params = dict(self.store.info(identity_id).key.params)
            with contextlib.suppress(KeyError, ValueError):
                ident.resolution = int(params["resolution"])
        with self._id_lock:
            self._id_stats["misses"] += 1
            if self.config.identity_cache_size:
                # With a device cache the condition's tensors belong to it (and its budget);
                # token identities are small host tensors it does not hold.
                keep = enroller.device_cache is None or method == "tokens"
                cached = ident if keep else _Identity(None, method, ident.steps, ident.resolution)
                self._identities[identity_id] = cached
                while len(self._identities) > self.config.identity_cache_size:
                    self._identities.popitem(last=False)
        return ident

    def forget(self, identity_id: str) -> bool:
        """Drop an identity's cached condition (after a delete, or when Ray unloads it)."""
        if self.enroller is not None:
            self.enroller.forget(identity_id)
        with self._id_lock:
            return self._identities.pop(identity_id, None) is not None

    def cached_identities(self) -> list[str]:
        with self._id_lock:
            return list(self._identities)

    def enroll(self, images: Sequence[bytes], method: str = "ip", steps: int | None = None, **options):
        """Enroll face photos (raw file bytes); returns pidrt.identity.enroll.Enrollment.

        `steps` (EAA) defaults to the generator's default step count; generations of the identity
        run it (and take it as their default). Other options go to EnrollOptions (caption,
        face_policy, resolution, names: what errors call each image, ...).
        """
        from pidrt.identity.enroll import EnrollOptions

        enroller = self._require_store()
        if self._closed:
            raise GeneratorClosed("the generator is shutting down")
        if method == "tokens":  # one token file (pidrt.identity.token_store); the options a face needs do not apply
            return enroll_tokens(enroller, images, steps=steps, **options)
        if method not in METHODS:
            raise InvalidRequest(f"unknown method {method!r}; choose one of {list(METHODS) + ['tokens']}")
        steps = self.config.defaults.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.limits.max_steps:
            raise InvalidRequest(f"steps must be an integer in 1..{self.config.limits.max_steps}; got {steps!r}")
        if not images or not all(isinstance(i, (bytes, bytearray)) and len(i) for i in images):
            raise InvalidRequest("enrollment needs one or more non-empty image files")
        options = {k: v for k, v in options.items() if v is not None}
        options.setdefault("detector", self.config.enroll_detector)
        opts = EnrollOptions(method, steps=steps, **options)
        # EAA inversion and the retouch's reference path drive the UNet's branch state: not while a batch runs.
        with self._pipe_lock if method == "eaa" or opts.retouch else contextlib.nullcontext():
            return enroller.enroll(list(images), opts)

    def list_identities(self):
        return self._require_store().store.list()

    def show_identity(self, identity_id: str):
        return self._require_store().store.show(identity_id)

    def delete_identity(self, identity_id: str) -> None:
        self._require_store().store.delete(identity_id)
        self.forget(identity_id)

    # ------------------------------------------------------------------ requests
    def resolve(self, req: GenerationRequest) -> ResolvedRequest:
        """Validate a request and fill in defaults (InvalidRequest names the bad field): the scale
        of the identity's method (adapter metadata, else the paper's) and, for an EAA identity,
        the step count it was enrolled for."""
        return resolve_request(req, self.config, self.preset, self.scales, lambda ident: self.identity(ident).steps)

    def _check_identity(self, r: ResolvedRequest, ident: _Identity) -> None:
        if ident.method != "eaa":
            return
        if ident.steps is not None and ident.steps != r.steps:
            raise InvalidRequest(f"EAA identity {r.identity} was enrolled for {ident.steps} steps; this request "
                                 f"runs {r.steps}. Ask for steps={ident.steps} or enroll it again.")
        if r.scheduler != "ddim":
            raise InvalidRequest(f"EAA identities follow the DDIM schedule they were recorded on; use scheduler "
                                 f"'ddim', not {r.scheduler!r}")
        if ident.resolution is not None and (r.width, r.height) != (ident.resolution, ident.resolution):
            raise InvalidRequest(f"EAA identity {r.identity} was enrolled at {ident.resolution}x{ident.resolution}; "
                                 f"this request asks for {r.width}x{r.height}")

    def _tokens(self, r: ResolvedRequest):
        """The request's TokenIdentity (None without one), checked with its prompt against this
        model and backend (pidrt.runtime.token_requests)."""
        tokens = self.identity(r.tokens).condition if r.tokens is not None else None
        cross = [layer.name for layer in getattr(self.pipe, "layers", ()) if layer.kind == "cross"]
        admit_tokens(r.prompt, tokens, r.tokens, text_dim=self.preset.text.hidden_size, cross_layers=cross,
                     base_model=lambda: self._require_store().base_fingerprint(),
                     layers_refusal=getattr(self.pipe, "layer_contexts_unavailable", None))
        return tokens

    def submit(self, request: GenerationRequest | ResolvedRequest,
               on_event: Callable[[Event], None] | None = None) -> Job:
        """Validate and enqueue; returns at once. Raises InvalidRequest, UnknownIdentityError,
        Overloaded or GeneratorClosed instead of queuing a request that cannot run."""
        try:
            if self._closed:
                raise GeneratorClosed("the generator is shutting down")
            r = request if isinstance(request, ResolvedRequest) else self.resolve(request)
            check_variant(r.edit, self.pipe)  # an inpainting variant this UNet cannot run
            if self._admit is not None:
                self._admit(r)
            condition = None
            if r.identity is not None:
                ident = self.identity(r.identity)
                self._check_identity(r, ident)
                condition = ident.condition if ident.condition is not None else self._require_store().condition(r.identity)
            tokens = self._tokens(r)
            job = Job(self, r, condition, on_event, tokens)
            job.retouch = self.retouch.prepare(r)
            job.entry = Entry(r.batch_key, r.method, r.n, job)
            with job._lock:
                try:
                    self._queue.put(job.entry)
                except QueueFull as exc:
                    raise Overloaded(f"{exc}; retry later", retry_after=self.retry_after()) from None
                except QueueClosed:
                    raise GeneratorClosed("the generator is shutting down") from None
                job._emit("queued", data={"position": len(self._queue)})
        except Exception as exc:
            self._notify("on_rejected", exc)
            raise
        return job

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Blocking: submit and wait."""
        return self.submit(request).result(timeout)

    async def agenerate(self, request: GenerationRequest,
                        on_event: Callable[[Event], None] | None = None) -> GenerationResult:
        """Asyncio: submit (off the event loop: a cold identity reads the store) and await."""
        job = await asyncio.to_thread(self.submit, request, on_event)
        return await job.wait()

    def retry_after(self) -> float:
        """Seconds until the queue has probably drained enough to take another request."""
        batches = math.ceil((self._queue.pending_images() + 1) / self.config.max_batch)
        return max(1.0, round(batches * self._batch_seconds, 1))

    def queue_depth(self) -> int:
        return len(self._queue)

    def stats(self) -> dict:
        with self._jobs_lock:
            running = len(self._running)
            sizes = dict(sorted(self._batch_sizes.items()))
            outcomes = dict(self._outcomes)
            images = self._images
        with self._id_lock:
            ids = {"entries": len(self._identities), "capacity": self.config.identity_cache_size, **self._id_stats}
        return {"queue_depth": len(self._queue), "queued_images": self._queue.pending_images(), "running": running,
                "batches": sum(sizes.values()), "batch_sizes": sizes, "images": images, "outcomes": outcomes,
                "avg_batch_s": round(self._batch_seconds, 4), "text_cache": self.text_cache.stats(),
                "identity_cache": ids, "backend": self.backend, "ready": self.ready,
                **({"backend_report": self._report()} if self._report is not None else {})}

    def _job_finished(self, job: Job) -> None:
        with self._jobs_lock:
            self._outcomes[job.state] += 1
            if job.state == "done" and job._result is not None:
                self._images += len(job._result.images)
        self._notify("on_job_done", job)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            batch = self._queue.take(poll_s=1.0)
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._run_batch([e.item for e in batch])
            except Exception:  # never reached by design; the worker must survive anyway
                log.exception("generator worker: unexpected error")

    def _sampling(self, r: ResolvedRequest) -> SamplingConfig:
        kw = dict(steps=r.steps, guidance=r.guidance, height=r.height, width=r.width, scheduler=r.scheduler,
                  folded=self.config.folded)
        if "eaa_placement" in {f.name for f in fields(SamplingConfig)}:
            kw["eaa_placement"] = self.config.eaa_placement
        return SamplingConfig(**kw)

    def _run_batch(self, jobs: list[Job], isolated: bool = False) -> None:
        jobs = [j for j in jobs if not j.done]
        method = next((j.request.method for j in jobs if j.request.method), None)
        info = BatchInfo(next(self._batch_ids), sum(j.request.n for j in jobs), len(jobs), method)
        started = [j for j in jobs if j._start(info)]
        if not started:
            return
        if len(started) != len(jobs):  # one expired or was cancelled in between
            jobs = started
            info = BatchInfo(info.id, sum(j.request.n for j in jobs), len(jobs), method)
        with self._jobs_lock:
            self._running = list(jobs)
            self._batch_sizes[info.images] += 1
        self._notify("on_batch", info, jobs)
        r0 = jobs[0].request
        specs = []
        for j in jobs:
            r = j.request
            schedule = ScaleSchedule(r.scale, r.scale_start, r.scale_end)
            edit = None if r.edit is None else r.edit.edit
            specs += [ImageSpec(r.prompt, s, r.negative_prompt, j.condition, schedule, j.tokens, edit=edit)
                      for s in r.seeds]

        def on_step(i: int, steps: int) -> None:
            alive = False
            now = time.monotonic()
            for j in jobs:
                if j.done:
                    continue
                if now >= j.deadline:
                    j._expire()
                    continue
                j._emit("step", step=i + 1, steps=steps)
                alive = True
            if not alive:
                raise _Stop()

        clock = time.perf_counter()
        try:
            with self._pipe_lock:
                out = (self.retouch.run(self._sampling(r0), jobs, specs, on_step) if r0.retouch is not None else
                       self.pipe.generate(self._sampling(r0), specs, on_step=on_step, encode=self.text_cache))
        except _Stop:
            return
        except Exception as exc:
            live = [j for j in jobs if not j.done]
            if len(live) > 1 and not isolated:
                log.warning("batch %d failed (%s: %s); running its %d requests one by one",
                            info.id, type(exc).__name__, exc, len(live))
                for j in live:
                    j.state, j.entry = "queued", None
                    self._run_batch([j], isolated=True)
                return
            if not isinstance(exc, PidrtError):
                log.exception("batch %d failed", info.id)
                exc = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
            for j in live:
                j.cancel_with(exc)
            return
        finally:
            with self._jobs_lock:
                self._running = []
        seconds = time.perf_counter() - clock
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        pixels = out.images.detach().float().clamp(0, 1).cpu()
        latents = out.latents.detach().float().cpu()
        row = 0
        for j in jobs:
            rows = slice(row, row + j.request.n)
            row += j.request.n
            if j.done:
                continue  # cancelled or timed out while batched: its rows are dropped
            try:
                self._post.submit(self._complete, j, pixels[rows], latents[rows], dict(out.timings), info,
                                  functools.partial(image_extras, j.request, out, rows))
            except RuntimeError:  # the encoder pool is shut down: close() gave up waiting for this batch
                j.cancel_with(GeneratorClosed("the generator shut down before the images were encoded"))

    def _complete(self, job: Job, pixels: torch.Tensor, latents: torch.Tensor, timings: dict, info: BatchInfo,
                  extras: Callable[[], list[dict]]):
        try:
            r = job.request
            clock = time.perf_counter()
            arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            more = extras()
            if r.edit is not None and r.edit.face is not None:  # restored faces go back into their photo
                arrays = r.edit.paste_back(arrays)
                pixels = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
            images = [
                GeneratedImage(index=i, seed=seed, data=encode_image(arr, r.output_format, r.quality),
                               format=r.output_format, width=arr.shape[1], height=arr.shape[0], identity=r.identity,
                               method=r.method, backend=self.backend, pixels=pixels[i].clone(),
                               latents=latents[i].clone(), **more[i])
                for i, (seed, arr) in enumerate(zip(r.seeds, arrays))
            ]
            timings = {"queue_s": (job.started or job.submitted) - job.submitted, **timings,
                       "encode_s": time.perf_counter() - clock, "total_s": time.monotonic() - job.submitted}
            job._finish(result=GenerationResult(job.id, int(job.created), r, images,
                                                {k: round(v, 6) for k, v in timings.items()}, info, self.backend))
        except Exception as exc:
            log.exception("encoding the images of job %s failed", job.id)
            job.cancel_with(GenerationFailed(f"encoding images failed: {type(exc).__name__}: {exc}"))

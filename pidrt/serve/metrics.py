"""Prometheus metrics of one app, in its own CollectorRegistry (so tests can build several apps).

pidrt_queue_depth                         requests waiting for a batch (local engine)
pidrt_jobs_running                        requests in flight through the service
pidrt_batch_images / pidrt_batch_requests images and requests per UNet batch (histograms)
pidrt_stage_seconds{stage}                queue, text_encode, vae_encode, unet_loop, vae_decode, encode, total
pidrt_images_generated_total              images returned to callers
pidrt_errors_total{type}                  invalid_request, unknown_identity, overloaded, timeout, ...
pidrt_requests_total{route,status}        HTTP requests by route template and status
pidrt_request_seconds{route}              HTTP latency until the response starts
pidrt_enroll_seconds{method}              enrollment latency
"""

from __future__ import annotations

from pidrt.errors import require

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    def __init__(self, max_batch: int = 8, registry=None):
        prom = require("prometheus_client", "serve")
        self._prom = prom
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.queue_depth = prom.Gauge("pidrt_queue_depth", "Requests waiting for a batch", registry=r)
        self.running = prom.Gauge("pidrt_jobs_running", "Requests in flight through the service", registry=r)
        sizes = tuple(float(i) for i in range(1, max(1, max_batch) + 1))
        self.batch_images = prom.Histogram("pidrt_batch_images", "Images per UNet batch", buckets=sizes, registry=r)
        self.batch_requests = prom.Histogram("pidrt_batch_requests", "Requests per UNet batch", buckets=sizes,
                                             registry=r)
        self.stage_seconds = prom.Histogram("pidrt_stage_seconds", "Per-request latency of each stage",
                                            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.images = prom.Counter("pidrt_images_generated", "Images returned to callers", registry=r)
        self.errors = prom.Counter("pidrt_errors", "Errors by type", ["type"], registry=r)
        self.requests = prom.Counter("pidrt_requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = prom.Histogram("pidrt_request_seconds", "HTTP latency until the response starts",
                                              ["route"], buckets=STAGE_BUCKETS, registry=r)
        self.enroll_seconds = prom.Histogram("pidrt_enroll_seconds", "Enrollment latency", ["method"],
                                             buckets=STAGE_BUCKETS, registry=r)

    # ---- generator observer hooks (local engine: exact per batch)
    def on_batch(self, info, jobs) -> None:
        self.batch_images.observe(info.images)
        self.batch_requests.observe(info.requests)

    def bind_queue(self, depth_fn) -> None:
        self.queue_depth.set_function(depth_fn)

    # ---- service side
    def observe_result(self, result) -> None:
        for name, seconds in result.timings.items():
            self.stage_seconds.labels(name[:-2] if name.endswith("_s") else name).observe(seconds)
        self.images.inc(len(result.images))

    def observe_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

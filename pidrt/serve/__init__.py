"""The HTTP service (`pidrt serve`) and its Ray Serve scale-out over `pidrt.runtime.generator`.

Modules: `protocol` (request / response bodies), `service` (what the routes call: an engine plus
jobs and metrics), `routes` (FastAPI endpoints), `app` (`create_app`, `serve_main`), `metrics`
(Prometheus), `factory` (the Generator from runtime options), `ray_app` (Ray Serve).
FastAPI, uvicorn, prometheus-client and Ray are imported only by the modules that need them.
"""

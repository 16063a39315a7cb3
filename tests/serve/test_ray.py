"""Ray Serve scale-out on CPU: two tiny-preset generator replicas on the ort backend behind the same
HTTP API (the graphs come from `pidrt.export.testing.tiny_export`, shared with the other tests)."""

from __future__ import annotations

import socket

import httpx
import pytest
import ray
from ray import serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ort_replicas_route_identities_by_affinity(tmp_path, photos, make_config):
    from pidrt.engines.options import BackendOptions
    from pidrt.export.testing import tiny_export
    from pidrt.serve.ray_app import Autoscaling, RaySettings, build_ray_app

    assert Autoscaling(min_replicas=1, max_replicas=4).to_ray()["max_replicas"] == 4
    tiny_export("ip")
    engines = tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder"))
    port = free_port()
    settings = RaySettings(store_dir=str(tmp_path / "store"), num_gpus=0, num_cpus=0, num_replicas=2,
                           max_identities_per_replica=4, generator=make_config(max_wait_ms=20),
                           backend=BackendOptions(backend="ort", engines=engines, methods=("ip",), threads=1))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_app(settings), name=settings.app_name, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["backend"] == "ort"
            ids = []
            for photo in photos:
                r = c.post("/v1/identities", files=[("images", ("face.png", photo, "image/png"))],
                           data={"method": "ip"})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            replicas: dict[str, set] = {i: set() for i in ids}
            for k in range(6):
                ident = ids[k % 2]
                r = c.post("/v1/images/generations", json={"prompt": "a portrait", "identity": ident, "seed": k})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["data"][0]["identity"] == ident and body["data"][0]["seed"] == k
                assert body["backend"] == "ort"
                replicas[ident].add(body["replica"])
            # Identity affinity: each identity's requests stayed on the replica that loaded it.
            assert all(len(r) == 1 for r in replicas.values()), replicas

            r = c.post("/v1/images/generations", json={"prompt": "p", "identity": "ip-0123456789abcdef"})
            assert r.status_code == 404 and "unknown identity" in r.json()["error"]["message"]
            r = c.post("/v1/images/generations", json={"prompt": "p", "size": "60x60"})
            assert r.status_code == 400, r.text

            job = c.post("/v1/jobs", json={"prompt": "p", "steps": 3, "seed": 1}).json()["id"]
            events = [line[7:] for line in c.get(f"/v1/jobs/{job}/events").text.splitlines()
                      if line.startswith("event: ")]
            assert events == ["queued", "started", "step", "step", "step", "done"]
            assert c.get(f"/v1/jobs/{job}").json()["state"] == "done"

            listed = {e["id"] for e in c.get("/v1/identities").json()["data"]}
            assert set(ids) <= listed
            assert c.delete(f"/v1/identities/{ids[0]}").status_code == 200
            # Deleted in the shared store: the replica holding it in memory refuses it too.
            r = c.post("/v1/images/generations", json={"prompt": "p", "identity": ids[0]})
            assert r.status_code == 404
            assert "pidrt_requests_total" in c.get("/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()

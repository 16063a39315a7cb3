"""What it takes to put the service on a network: API keys on every route, body limits enforced
as the bytes arrive, one error shape for every failure (the framework's own included)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pidrt.errors import PidrtError
from pidrt.serve import auth as auth_module
from pidrt.serve.app import create_app
from pidrt.serve.auth import AuthConfig, check_bind, load_auth, parse_keys
from pidrt.serve.service import ServiceConfig

ADMIN, GEN = "admin-key-0123456789abcdef", "generate-key-0123456789ab"
WRONG = "wrong-key-0123456789abcdefgh"
UNKNOWN_ID = "ip-0123456789abcdef"


@pytest.fixture(scope="module")
def keys() -> AuthConfig:
    return load_auth(env={"PIDRT_API_KEYS": f"{ADMIN} admin, {GEN} generate"})


@pytest.fixture(scope="module")
def secured(generator, keys):
    return create_app(generator, auth=keys)


def bearer(key):
    return {} if key is None else {"Authorization": f"Bearer {key}"}


# (method, path, request kwargs, role needed: None = open)
ROUTES = [
    ("GET", "/healthz", {}, None),
    ("GET", "/readyz", {}, None),
    ("GET", "/metrics", {}, "generate"),
    ("GET", "/v1/stats", {}, "generate"),
    ("POST", "/v1/images/generations", {"json": {"prompt": "p", "steps": 1, "seed": 1}}, "generate"),
    ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "p", "steps": 1, "seed": 1}}, "generate"),
    ("POST", "/v1/jobs", {"json": {"prompt": "p", "steps": 1, "seed": 2}}, "generate"),
    ("POST", "/v1/images/edits", {"data": {"prompt": "p"}}, "generate"),  # the right key: 400, no image
    ("POST", "/v1/jobs/edits", {"data": {"prompt": "p"}}, "generate"),
    ("GET", "/v1/jobs/job-nope", {}, "generate"),
    ("GET", "/v1/jobs/job-nope/events", {}, "generate"),
    ("POST", "/v1/jobs/job-nope/cancel", {}, "generate"),
    ("GET", "/v1/identities", {}, "generate"),
    ("GET", f"/v1/identities/{UNKNOWN_ID}", {}, "generate"),
    ("POST", "/v1/identities", {"data": {"method": "ip"}}, "admin"),
    ("DELETE", f"/v1/identities/{UNKNOWN_ID}", {}, "admin"),
    ("GET", "/no/such/route", {}, "generate"),  # a client without a key learns nothing about routes
]


def test_auth_matrix_on_every_route(secured, call, caplog):
    async def go(c):
        out = {}
        for method, path, kw, _ in ROUTES:
            for who, key in (("none", None), ("wrong", WRONG), ("generate", GEN), ("admin", ADMIN)):
                r = await c.request(method, path, headers=bearer(key), **kw)
                out[(path, method, who)] = r
        r = await c.get("/v1/stats", headers={"Authorization": f"Basic {ADMIN}"})
        out["basic"] = r
        out["lower"] = await c.get("/v1/stats", headers={"Authorization": f"bearer {GEN}"})
        return out

    with caplog.at_level(logging.DEBUG):
        out = call(secured, go)
    for method, path, _, role in ROUTES:
        for who in ("none", "wrong", "generate", "admin"):
            r = out[(path, method, who)]
            if role is None:
                assert r.status_code not in (401, 403), (method, path, who)
            elif who in ("none", "wrong"):
                assert r.status_code == 401, (method, path, who, r.text)
                assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "unauthorized"
            elif role == "admin" and who == "generate":
                assert r.status_code == 403 and "needs 'admin'" in r.json()["error"]["message"], (method, path)
            else:  # the right key: the route itself answers (a success, or its own 4xx on these bodies)
                assert r.status_code not in (401, 403), (method, path, who, r.text)
    assert out[("/v1/images/generations", "POST", "generate")].status_code == 200
    assert out[("/sdapi/v1/txt2img", "POST", "admin")].status_code == 200  # admin implies generate
    assert out[("/no/such/route", "GET", "admin")].status_code == 404
    assert out["basic"].status_code == 401 and out["lower"].status_code == 200
    for key in (ADMIN, GEN, WRONG):  # keys are never logged
        assert not any(key in r.getMessage() for r in caplog.records)


def test_metrics_flag_and_refusals_counted(generator, keys, call):
    public = create_app(generator, auth=AuthConfig(keys.keys, public_metrics=True))

    async def go(c):
        assert (await c.get("/v1/stats")).status_code == 401
        return await c.get("/metrics")

    r = call(public, go)
    assert r.status_code == 200 and 'pidrt_errors_total{type="unauthorized"} 1.0' in r.text


def test_keys_compared_in_constant_time(keys, monkeypatch):
    calls = []
    real = auth_module.hmac.compare_digest
    monkeypatch.setattr(auth_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert auth_module.match(keys, f"Bearer {ADMIN}").role == "admin"
    assert len(calls) == len(keys.keys)  # every key compared, even after the first one matched
    assert ADMIN not in repr(keys) and GEN not in repr(keys)


def test_key_sources(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# operators\n{ADMIN}\n\n{GEN}   generate  # the web frontend\n")
    cfg = load_auth(path, env={})
    assert [k.role for k in cfg.keys] == ["admin", "generate"] and cfg.enabled
    both = load_auth(path, env={"PIDRT_API_KEYS": WRONG + " generate"})
    assert len(both.keys) == 3
    assert not load_auth(None, env={}).enabled
    bad = {
        "short generate": "at least 16",
        f"{ADMIN} root": "unknown role",
        f"{ADMIN} admin extra": "expected 'KEY' or 'KEY ROLE'",
    }
    for text, words in bad.items():
        with pytest.raises(PidrtError, match=words):
            parse_keys(text, "test")
    with pytest.raises(PidrtError, match="two roles"):
        load_auth(None, env={"PIDRT_API_KEYS": f"{ADMIN} admin,{ADMIN} generate"})
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(PidrtError, match="holds no keys"):
        load_auth(tmp_path / "empty", env={})
    with pytest.raises(PidrtError, match="cannot read the API key file"):
        load_auth(tmp_path / "absent", env={})


def test_unauthenticated_binds_loopback_only(keys, caplog):
    with caplog.at_level(logging.WARNING, logger="pidrt.serve.auth"):
        check_bind("127.0.0.1", AuthConfig())
    assert any("UNAUTHENTICATED" in r.getMessage() for r in caplog.records)
    for host in ("0.0.0.0", "10.1.2.3", "pidrt.example.com", "::"):
        with pytest.raises(PidrtError, match="without API keys"):
            check_bind(host, AuthConfig())
        check_bind(host, AuthConfig(), allow_unauthenticated=True)
        check_bind(host, keys)
    check_bind("::1", AuthConfig())
    check_bind("localhost", AuthConfig())


# ------------------------------------------------------------------------------- body limits
def asgi_call(app, method, path, headers, chunks):
    """Call the ASGI app directly; `chunks` are what the client would still send. Returns
    (status, body, how many body chunks the app pulled)."""
    pulled, sent = 0, []
    chunks = list(chunks)

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # the client waits for the answer

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("pidrt.test", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


@pytest.fixture(scope="module")
def small(generator):
    return create_app(generator, ServiceConfig(max_json_bytes=1000, max_upload_bytes=2000, max_upload_images=1))


def test_json_body_refused_as_it_streams(small):
    # 64 KiB of JSON in 100-byte chunks, without a Content-Length (chunked upload).
    chunks = [b'{"prompt": "' + b"x" * 88] + [b"x" * 100] * 654
    status, body, pulled = asgi_call(small, "POST", "/v1/images/generations",
                                     {"content-type": "application/json"}, chunks)
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert "1000 byte limit" in body["error"]["message"]
    assert pulled <= 11 < len(chunks)  # refused once it crossed the limit, long before the end


def test_declared_length_refused_before_reading(small):
    for content_type in ("application/json", "multipart/form-data; boundary=xyz"):
        status, body, pulled = asgi_call(small, "POST", "/v1/images/generations",
                                         {"content-type": content_type, "content-length": str(150 << 20)}, [b"{}"])
        assert status == 413 and pulled == 0 and body["error"]["code"] == 413


def test_multipart_upload_refused_as_it_streams(small):
    from pidrt.serve.limits import multipart_limit

    head = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="huge.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunks = [head] + [b"\x89" * 4096] * 2000  # 8 MiB
    status, body, pulled = asgi_call(small, "POST", "/v1/identities",
                                     {"content-type": "multipart/form-data; boundary=xyz"}, chunks)
    assert status == 413 and "multipart body" in body["error"]["message"]
    assert pulled * 4096 <= multipart_limit(2000, 1) + 2 * 4096 and pulled < len(chunks)


# ------------------------------------------------------------------------------ error shape
def assert_error_shape(r, status, kind=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"]
    if kind is not None:
        assert body["error"]["type"] == kind, body


def test_every_framework_error_has_the_error_shape(app, generator, call):
    no_metrics = create_app(generator, metrics=False)

    async def go(c):
        assert_error_shape(await c.get("/no/such/route"), 404, "not_found")
        r = await c.get("/v1/images/generations")
        assert_error_shape(r, 405, "method_not_allowed")
        assert "POST" in r.headers["allow"] and "POST" in r.json()["error"]["message"]
        assert_error_shape(await c.delete("/v1/jobs/job-1/cancel"), 405)
        assert_error_shape(await c.post("/v1/images/generations", content=b'{"prompt": "p",',
                                        headers={"content-type": "application/json"}), 400, "invalid_request")
        assert_error_shape(await c.post("/v1/images/generations", json={"prompt": 5}), 400, "invalid_request")
        assert_error_shape(await c.post("/v1/identities", content=b"--xyz\r\ngarbage",
                                        headers={"content-type": "multipart/form-data; boundary=xyz"}), 400)
        assert_error_shape(await c.post("/v1/identities", content=b"not a form",
                                        headers={"content-type": "multipart/form-data"}), 400)
        # Multipart limits of the form parser (more than 1000 fields).
        fields = "&".join(f"f{i}=1" for i in range(1100))
        assert_error_shape(await c.post("/v1/identities", content=fields.encode(),
                                        headers={"content-type": "application/x-www-form-urlencoded"}), 400)
        assert_error_shape(await c.get(f"/v1/identities/{UNKNOWN_ID}"), 404, "unknown_identity")
        assert_error_shape(await c.get("/v1/jobs/job-nope"), 404, "not_found")

    async def go_disabled(c):
        assert_error_shape(await c.get("/metrics"), 404, "not_found")

    call(app, go)
    call(no_metrics, go_disabled)


def test_messages_name_ids_not_server_paths(app, generator, photos, call):
    root = str(generator.store.root)

    async def go(c):
        ident = (await c.post("/v1/identities", files=[("images", ("me.png", photos[0], "image/png"))],
                              data={"method": "ip"})).json()["id"]
        missing = [await c.get(f"/v1/identities/{UNKNOWN_ID}"), await c.delete(f"/v1/identities/{UNKNOWN_ID}"),
                   await c.post("/v1/images/generations", json={"prompt": "p", "identity": UNKNOWN_ID})]
        # Tamper with what generation reads: the entry is reported corrupt, by id.
        path = generator.store.path(ident)
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header["__metadata__"]["n_tokens"] = "5"
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        generator.forget(ident)
        corrupt = [await c.post("/v1/images/generations", json={"prompt": "p", "identity": ident}),
                   await c.get(f"/v1/identities/{ident}")]
        listed = (await c.get("/v1/identities")).json()["data"]
        await c.delete(f"/v1/identities/{ident}")
        return ident, missing, corrupt, listed

    ident, missing, corrupt, listed = call(app, go)
    for r in missing:
        assert_error_shape(r, 404, "unknown_identity")
        assert UNKNOWN_ID in r.json()["error"]["message"] and root not in r.text and ".safetensors" not in r.text
    for r in corrupt:
        assert_error_shape(r, 500, "corrupt_identity")
        assert ident in r.text and "metadata changed" in r.text and root not in r.text
    assert ident not in [e["id"] for e in listed]


def test_ray_ingress_takes_the_same_keys(tmp_path, keys, call):
    """The Ray Serve ingress is the same app: its routes need the same keys (no Ray cluster needed
    to check: the key check answers before the engine is reached)."""
    from pidrt.serve.ray_app import RaySettings, _ingress_builder, run_ray

    settings = RaySettings(store_dir=str(tmp_path / "store"), auth=keys)
    ingress = _ingress_builder(settings)()

    async def go(c):
        return (await c.get("/healthz"), await c.get("/v1/stats"), await c.post("/sdapi/v1/txt2img", json={}),
                await c.delete(f"/v1/identities/{UNKNOWN_ID}", headers=bearer(GEN)))

    health, stats, a1111, delete = call(ingress, go)
    assert health.status_code == 200 and stats.status_code == 401 and a1111.status_code == 401
    assert delete.status_code == 403
    with pytest.raises(PidrtError, match="without API keys"):  # refused before Ray starts
        run_ray(RaySettings(store_dir=str(tmp_path / "store")), host="0.0.0.0")

"""The FastAPI endpoints (thin: parse, call the service, render)."""

from __future__ import annotations

import json
import time
from typing import Optional

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pidrt.serve.edits_form import edit_form
from pidrt.serve.errors import error_json, install_error_handlers
from pidrt.serve.protocol import (
    GenerationBody,
    event_body,
    identity_body,
    result_body,
)
from pidrt.runtime.requests import GenerationRequest
from pidrt.serve.service import ImageService, UploadError, UploadTooLarge


class MetricsMiddleware:
    """Pure ASGI (streams and disconnect detection pass through untouched): counts and times requests."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        clock = time.perf_counter()
        seen = False

        async def send_wrapper(message):
            nonlocal seen
            if message["type"] == "http.response.start" and not seen:
                seen = True
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.observe_http(route, message["status"], time.perf_counter() - clock)
            await send(message)

        await self.app(scope, receive, send_wrapper)


def install_routes(app: FastAPI, service: ImageService, metrics) -> None:
    cfg = service.config
    install_error_handlers(app, service.count_error)

    # ------------------------------------------------------------------ generations
    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request):
        result = await service.generate(body.to_request(), request.is_disconnected)
        return result_body(result)

    edit = Depends(edit_form(cfg.max_upload_bytes))  # multipart: image, mask, prompt, ... (edits_form.py)

    @app.post("/v1/images/edits")
    async def edits(request: Request, req: GenerationRequest = edit):
        return result_body(await service.generate(req, request.is_disconnected))

    # ------------------------------------------------------------------ jobs
    async def queued(req: GenerationRequest) -> dict:
        rec = await service.create_job(req)
        return {**rec.summary(), "object": "job", "events_url": f"/v1/jobs/{rec.id}/events"}

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: GenerationBody):
        return await queued(body.to_request())

    @app.post("/v1/jobs/edits", status_code=202)
    async def create_edit_job(req: GenerationRequest = edit):
        return await queued(req)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        rec = service.get_job(job_id)
        out = {**rec.summary(), "object": "job"}
        if rec.result is not None:
            out["result"] = result_body(rec.result)
        return out

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        rec = service.cancel_job(job_id)
        return {**rec.summary(), "object": "job"}

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        rec = service.get_job(job_id)

        async def sse():
            async for ev in rec.stream(cfg.sse_keepalive_s):
                if ev is None:
                    yield ": keepalive\n\n"
                    continue
                data = json.dumps(event_body(ev, rec.id), separators=(",", ":"))
                yield f"id: {ev.seq}\nevent: {ev.type}\ndata: {data}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ identities
    @app.post("/v1/identities", status_code=201)
    async def enroll(images: Optional[list[UploadFile]] = File(None, description="face photos (one person)"),
                     method: str = Form("ip"),
                     steps: Optional[int] = Form(None),
                     caption: Optional[str] = Form(None),
                     face_policy: Optional[str] = Form(None),
                     tokens: Optional[UploadFile] = File(None, description="method=tokens: a token file"),
                     placeholder: Optional[str] = Form(None),
                     retouch: bool = Form(False, description="also record the Layout-and-Retouch reference path")):
        if method == "tokens":  # one token file instead of photos (docs/token-identities.md)
            if images or tokens is None or retouch:
                raise UploadError("method=tokens takes one token file in the `tokens` field, no images and no "
                                  "retouch (a reference path is recorded from a face photo)")
            data, names = await _read_uploads([tokens])
            options = {"placeholder": placeholder, "caption": caption, "face_policy": face_policy, "steps": steps}
        else:
            if not images or tokens is not None:
                raise UploadError("enrollment takes face photos in the `images` field (a token file: method=tokens)")
            data, names = await _read_uploads(images)
            options = {"caption": caption, "face_policy": face_policy, "steps": steps, "retouch": retouch or None}
        out = await service.enroll(data, method, {**options, "names": tuple(names)})
        return {"object": "identity", "id": out["identity_id"], "method": out["method"], "created": out["created"],
                "seconds": round(out["seconds"], 4), "retouch_reference": out.get("retouch_reference")}

    async def _read_uploads(uploads: list[UploadFile]) -> tuple[list[bytes], list[str]]:
        if len(uploads) > cfg.max_upload_images:
            raise UploadError(f"{len(uploads)} images uploaded; the limit is {cfg.max_upload_images}")
        data, names = [], []
        for n, upload in enumerate(uploads):
            blob = await upload.read(cfg.max_upload_bytes + 1)
            name = upload.filename or f"image {n + 1}"
            names.append(name)
            if len(blob) > cfg.max_upload_bytes:
                raise UploadTooLarge(f"{name} is larger than the {cfg.max_upload_bytes} byte limit")
            if not blob:
                raise UploadError(f"{name} is empty")
            data.append(blob)
        return data, names

    @app.get("/v1/identities")
    async def list_identities():
        return {"object": "list", "data": [identity_body(e) for e in await service.list_identities()]}

    @app.get("/v1/identities/{identity_id}")
    async def show_identity(identity_id: str):
        return {"object": "identity", **identity_body(await service.show_identity(identity_id))}

    @app.delete("/v1/identities/{identity_id}")
    async def delete_identity(identity_id: str):
        await service.delete_identity(identity_id)
        return {"object": "identity", "id": identity_id, "deleted": True}

    # ------------------------------------------------------------------ operations
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        body = await service.engine.readiness()  # while starting: what is still loading
        if body["status"] == "ready":
            return JSONResponse(body)
        # The one error shape: an `error` object, beside what start-up is doing.
        failure = body.get("error")
        message = f"start-up failed: {failure}" if failure else (
            f"the engine is not ready ({body['loading']})" if body.get("loading") else "the engine is not ready")
        body["error"] = {"message": message, "type": "not_ready", "param": None, "code": 503}
        return JSONResponse(body, status_code=503)

    @app.get("/v1/stats")
    async def stats():
        return await service.engine.stats()

    @app.get("/metrics")
    async def metrics_endpoint():
        if metrics is None:
            return error_json(404, "not_found", "metrics are disabled on this server")
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

"""One error shape for every answer that is not a success: `{"error": {message, type, param, code}}`.

pidrt's own errors, FastAPI's validation errors, Starlette's HTTP errors (an unknown route's 404,
405, an unparsable body, multipart limits) and what the middlewares refuse (401, 403, 413) all
leave through `error_json`, so a client parses one shape whatever failed. Messages name ids and
fields, never server paths.
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pidrt.errors import PidrtError
from pidrt.runtime.requests import GenerationError, Overloaded, error_info
from pidrt.serve.protocol import error_body

# The `type` of an HTTP error that did not come from pidrt (the framework's own).
HTTP_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
              422: "invalid_request"}


class JobNotFound(GenerationError):
    status, kind = 404, "not_found"


class ClientGone(GenerationError):
    status, kind = 499, "client_disconnected"


class UploadError(GenerationError):
    status, kind = 400, "invalid_request"


class UploadTooLarge(GenerationError):
    status, kind = 413, "upload_too_large"


def exception_from_info(info: dict) -> Exception:
    """Rebuild an error reported as {type, message, status[, retry_after]} (events, Ray replicas)."""
    from pidrt.identity.store import UnknownIdentityError
    from pidrt.runtime import requests as g

    kind, message = info.get("type", "internal_error"), info.get("message", "")
    if kind == "overloaded":
        return Overloaded(message, float(info.get("retry_after", 1.0)))
    if kind == "unknown_identity":
        return UnknownIdentityError(message)
    classes = {c.kind: c for c in (g.InvalidRequest, g.GenerationTimeout, g.Cancelled, g.GeneratorClosed,
                                   g.GenerationFailed, JobNotFound, UploadTooLarge)}
    cls = classes.get(kind)
    if cls is not None:
        return cls(message)
    err = GenerationError(message)
    err.status, err.kind = int(info.get("status", 500)), kind
    return err


def error_json(status: int, kind: str, message: str, param: str | None = None,
               headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body({"message": message, "type": kind, "status": status}, param),
                        status_code=status, headers=headers)


def error_response(exc: BaseException, param: str | None = None) -> JSONResponse:
    info = error_info(exc)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return error_json(info["status"], info["type"], info["message"], param, headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next(e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid")
        return f"malformed JSON body: {ctx.get('error', 'cannot parse')}", None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"no endpoint {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        return f"{request.method} is not allowed on {request.url.path}" + (f" (allowed: {allowed})" if allowed else "")
    if exc.detail == "There was an error parsing the body":
        return "cannot parse the request body (a multipart form or JSON of the declared content type)"
    return str(exc.detail)


def install_error_handlers(app: FastAPI, count=None) -> None:
    """Route every error through `error_json`; `count(exc_or_type)` records it in the metrics."""

    @app.exception_handler(PidrtError)
    async def _pidrt_error(request: Request, exc: PidrtError):
        if count is not None:
            count(exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        if count is not None:
            count("invalid_request")
        return error_json(400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = HTTP_TYPES.get(exc.status_code, "http_error")
        if count is not None:
            count(kind)
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() in ("allow", "www-authenticate")}
        return error_json(exc.status_code, kind, _http_message(request, exc), headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # Starlette logs it and re-raises after
        if count is not None:
            count("internal_error")
        return error_json(500, "internal_error", "internal server error (logged by the server)")

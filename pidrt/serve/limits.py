"""Request body limits enforced as the bytes arrive, before anything parses them.

`BodyLimit` is pure ASGI middleware. A declared `Content-Length` over the limit is refused with
413 before one byte of the body is read; a body without one (chunked) or that lies about it is
counted as it streams in, and the read that crosses the limit raises `BodyTooLarge` (a 413 HTTP
error the app renders in the one error shape) so neither the JSON parser nor the multipart
parser ever sees the rest. Multipart uploads (face photos) get their own, larger limit.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from pidrt.serve.errors import error_json

MULTIPART_OVERHEAD = 64 * 1024  # part headers, boundaries and the small form fields


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, what: str):
        super().__init__(413, f"the {what} body is larger than the {limit} byte limit")


def multipart_limit(max_upload_bytes: int, max_upload_images: int) -> int:
    """The most a valid enrollment upload can be: every file at its limit, plus form overhead."""
    return max_upload_images * (max_upload_bytes + MULTIPART_OVERHEAD) + MULTIPART_OVERHEAD


class BodyLimit:
    def __init__(self, app, max_json_bytes: int, max_multipart_bytes: int):
        self.app = app
        self.max_json_bytes, self.max_multipart_bytes = max_json_bytes, max_multipart_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        multipart = content_type.startswith("multipart/")
        limit = self.max_multipart_bytes if multipart else self.max_json_bytes
        what = "multipart" if multipart else "request"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await error_json(400, "invalid_request", "Content-Length is not a number")(scope, receive, send)
            if length > limit:
                # Refused from the header alone: the body is never read.
                return await error_json(413, "request_too_large", BodyTooLarge(limit, what).detail)(
                    scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, what)
            return message

        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:  # raised where no handler renders it (the app's own do)
            if started:
                raise
            await error_json(413, "request_too_large", exc.detail)(scope, receive, send)

"""The HTTP API's bodies: the OpenAI images shape plus pidrt's fields, and how results are rendered.

Pydantic checks types only; ranges and limits are the generator's (`Generator.resolve`), so a
Python caller and an HTTP caller are refused with the same messages.
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from pidrt.identity.token_store import summary
from pidrt.runtime.requests import (
    Event,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    parse_size,
)

Number = Union[StrictInt, StrictFloat]


class GenerationBody(BaseModel):
    """POST /v1/images/generations and POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI images API
    prompt: StrictStr
    n: StrictInt | None = None
    size: StrictStr | None = Field(None, description='"WxH" (e.g. "512x512") or "auto"')
    output_format: StrictStr | None = Field(None, description="png | jpeg | webp")
    output_compression: StrictInt | None = Field(None, description="jpeg / webp quality 0..100")
    response_format: StrictStr | None = Field(None, description="b64_json (the only one served)")
    model: StrictStr | None = None  # accepted and ignored: one model per server
    user: StrictStr | None = None
    quality: StrictStr | None = None  # accepted and ignored ("auto", "high", ...)
    # pidrt
    negative_prompt: StrictStr = ""
    identity: StrictStr | None = None
    method: StrictStr | None = None
    tokens: StrictStr | None = Field(None, description="a token identity id (tokens-…); its placeholder goes in the prompt")
    scale: Number | None = None
    scale_start: StrictInt = 0
    scale_end: StrictInt | None = None
    steps: StrictInt | None = None
    guidance: Number | None = None
    seed: Annotated[Union[StrictInt, list[StrictInt]], Field(union_mode="left_to_right")] | None = None
    scheduler: StrictStr | None = None
    timeout_s: Number | None = None

    def to_request(self) -> GenerationRequest:
        if self.response_format not in (None, "b64_json"):
            raise InvalidRequest(f"response_format {self.response_format!r} is not served; use 'b64_json'")
        width, height = parse_size(self.size)
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, identity=self.identity, method=self.method,
            scale=self.scale, scale_start=self.scale_start, scale_end=self.scale_end, steps=self.steps,
            guidance=self.guidance, seed=self.seed, width=width, height=height, n=self.n,
            output_format=self.output_format, quality=self.output_compression, scheduler=self.scheduler,
            timeout_s=self.timeout_s, tokens=self.tokens,
        )


def result_body(result: GenerationResult, extra: dict | None = None) -> dict[str, Any]:
    """The generations response: OpenAI's `created` / `data[].b64_json` plus per-image metadata."""
    r = result.request
    body = {
        "id": result.id,
        "created": result.created,
        "data": [
            {
                "b64_json": base64.b64encode(img.data).decode("ascii"),
                "index": img.index,
                "seed": img.seed,
                "identity": img.identity,
                "method": img.method,
                "tokens": r.tokens,
                "scale": r.scale,  # the identity strength used (the method's default when not asked)
                "backend": img.backend,
                "width": img.width,
                "height": img.height,
            }
            for img in result.images
        ],
        "output_format": r.output_format,
        "size": f"{r.width}x{r.height}",
        "usage": {"images": len(result.images), "steps": r.steps, "batch_images": result.batch.images,
                  "batch_requests": result.batch.requests},
        "timings": result.timings,
        "batch": asdict(result.batch),
        "request": r.as_dict(),
        "backend": result.backend,
    }
    if result.replica is not None:
        body["replica"] = result.replica
    if extra:
        body.update(extra)
    return body


def event_body(event: Event, job_id: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    """An event as JSON (the SSE `data:`); `done` carries the whole result body."""
    body: dict[str, Any] = {"job_id": job_id or event.job_id, "type": event.type, "seq": event.seq, "time": event.time}
    if event.step is not None:
        body["step"], body["steps"] = event.step, event.steps
    if event.type == "done" and event.result is not None:
        body["result"] = result_body(event.result, extra)
    elif event.type in ("error", "cancelled"):
        body["error"] = dict(event.data)
    elif event.data:
        body.update(event.data)
    return body


def error_body(info: dict, param: str | None = None) -> dict[str, Any]:
    """OpenAI-style error object."""
    return {"error": {"message": info["message"], "type": info["type"], "param": param, "code": info["status"]}}


def identity_body(entry) -> dict[str, Any]:
    """An identity store entry (pidrt.identity.store.EntryInfo) as JSON."""
    return {
        "id": entry.id,
        "method": entry.method,
        "created": entry.created,
        "bytes": entry.size,
        "params": dict(entry.key.params),
        "references": len(entry.key.images),
        "meta": dict(entry.meta),
        **({"tokens": summary(entry)} if entry.method == "tokens" else {}),
    }

"""`POST /v1/images/edits` (and `POST /v1/jobs/edits`): OpenAI's multipart images/edits shape.

Form fields: `image` (a file), optional `mask` (a file whose transparent pixels mark the region
to repaint; without alpha, white marks it), `prompt`, `n`, `size`, `response_format`,
`output_format`, `output_compression` (and `model`, `user`, `quality`, accepted and ignored, as
for generations), plus pidrt's fields: the identity ones of generations and `strength`,
`restore_face`, `upscale`, `face_only`, `inpainting`. Form parsing checks types only; the values
are checked where every caller's are (`Generator.resolve`, pidrt.runtime.edit_requests), so the
same bad edit gets the same 400 from HTTP, the CLI and Python. Each file is held to the
service's per-upload byte limit, as enrollment photos are.
"""

from __future__ import annotations

from typing import Optional

from fastapi import File, Form, UploadFile

from pidrt.runtime.requests import GenerationRequest, InvalidRequest, parse_size
from pidrt.serve.errors import UploadError, UploadTooLarge


async def _read(upload: UploadFile, what: str, limit: int) -> bytes:
    blob = await upload.read(limit + 1)
    if len(blob) > limit:
        raise UploadTooLarge(f"the {what} ({upload.filename or 'upload'}) is larger than the {limit} byte limit")
    if not blob:
        raise UploadError(f"the {what} is empty")
    return blob


def edit_form(max_upload_bytes: int):
    """A FastAPI dependency: the multipart form -> a GenerationRequest with the files' bytes."""

    async def parse(image: UploadFile = File(..., description="the photo to edit"),
                    mask: Optional[UploadFile] = File(None, description="transparent (or white) = repaint"),
                    prompt: str = Form(...),
                    n: Optional[int] = Form(None),
                    size: Optional[str] = Form(None),
                    response_format: Optional[str] = Form(None),
                    output_format: Optional[str] = Form(None),
                    output_compression: Optional[int] = Form(None),
                    model: Optional[str] = Form(None),  # accepted and ignored: one model per server
                    user: Optional[str] = Form(None),
                    quality: Optional[str] = Form(None),
                    negative_prompt: str = Form(""),
                    identity: Optional[str] = Form(None),
                    tokens: Optional[str] = Form(None),
                    method: Optional[str] = Form(None),
                    scale: Optional[float] = Form(None),
                    scale_start: int = Form(0),
                    scale_end: Optional[int] = Form(None),
                    steps: Optional[int] = Form(None),
                    guidance: Optional[float] = Form(None),
                    seed: Optional[int] = Form(None),
                    scheduler: Optional[str] = Form(None),
                    timeout_s: Optional[float] = Form(None),
                    strength: Optional[float] = Form(None),
                    restore_face: bool = Form(False),
                    upscale: Optional[float] = Form(None),
                    face_only: bool = Form(False),
                    inpainting: Optional[str] = Form(None)) -> GenerationRequest:
        if response_format not in (None, "b64_json"):
            raise InvalidRequest(f"response_format {response_format!r} is not served; use 'b64_json'")
        width, height = parse_size(size)
        return GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, identity=identity, method=method, scale=scale,
            scale_start=scale_start, scale_end=scale_end, steps=steps, guidance=guidance, seed=seed, width=width,
            height=height, n=n, output_format=output_format, quality=output_compression, scheduler=scheduler,
            timeout_s=timeout_s, tokens=tokens, init_image=await _read(image, "image", max_upload_bytes),
            mask=None if mask is None else await _read(mask, "mask", max_upload_bytes), strength=strength,
            restore_face=restore_face, upscale=upscale, face_only=face_only, inpainting=inpainting)

    return parse

"""`POST /sdapi/v1/txt2img`: AUTOMATIC1111's web-UI API shape over the same service.

Existing clients of that API can point at pidrt. The request takes A1111's fields (`prompt`,
`negative_prompt`, `steps`, `cfg_scale`, `seed` (-1: random), `width`, `height`, `batch_size`,
`n_iter`, `sampler_name`) plus pidrt's identity fields (`identity`, `method`, `scale`,
`scale_start`, `scale_end`, `timeout_s`); fields left out take pidrt's defaults (so an EAA
identity runs the steps it was enrolled for). The response is A1111's: `images` (base64 PNGs),
`parameters` (the request) and `info` (a JSON string: seeds, sampler, size, infotexts).

A1111 ignores fields it does not know, and its clients send many; so does this endpoint. Fields
that would change the image in a way pidrt cannot honour (hires fix, face restoration, tiling,
variation seeds, styles, scripts, a non-zero eta, another noise schedule) are refused with 400.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from pidrt.runtime.requests import GenerationRequest, GenerationResult, InvalidRequest

Number = Union[StrictInt, StrictFloat]

# A1111 sampler names -> pidrt schedulers (pidrt's own names are accepted too).
SAMPLERS = {"ddim": "ddim", "dpm++ 2m": "dpm++2m", "dpm++2m": "dpm++2m"}


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = ""
    negative_prompt: StrictStr = ""
    steps: Optional[StrictInt] = None
    cfg_scale: Optional[Number] = None
    seed: StrictInt = -1
    width: Optional[StrictInt] = None
    height: Optional[StrictInt] = None
    batch_size: StrictInt = 1
    n_iter: StrictInt = 1
    sampler_name: Optional[StrictStr] = None
    sampler_index: Optional[StrictStr] = None  # A1111's older name for sampler_name
    scheduler: Optional[StrictStr] = None  # A1111's noise schedule: only its default
    send_images: StrictBool = True
    # What pidrt cannot honour, at A1111's defaults
    enable_hr: StrictBool = False
    restore_faces: Optional[StrictBool] = None
    tiling: Optional[StrictBool] = None
    subseed_strength: Number = 0
    eta: Optional[Number] = None
    styles: Optional[list[StrictStr]] = None
    script_name: Optional[StrictStr] = None
    alwayson_scripts: Optional[dict[str, Any]] = None
    # pidrt
    identity: Optional[StrictStr] = None
    method: Optional[StrictStr] = None
    scale: Optional[Number] = None
    scale_start: StrictInt = 0
    scale_end: Optional[StrictInt] = None
    timeout_s: Optional[Number] = None

    def unsupported(self) -> list[str]:
        checks = {"enable_hr": self.enable_hr, "restore_faces": self.restore_faces, "tiling": self.tiling,
                  "subseed_strength": self.subseed_strength, "eta": self.eta, "styles": self.styles,
                  "script_name": self.script_name, "alwayson_scripts": self.alwayson_scripts}
        bad = [name for name, value in checks.items() if value]
        if self.scheduler not in (None, "", "Automatic", "automatic"):
            bad.append("scheduler")
        return bad

    def to_request(self) -> GenerationRequest:
        bad = self.unsupported()
        if bad:
            raise InvalidRequest(f"pidrt does not support {', '.join(bad)} on /sdapi/v1/txt2img; leave "
                                 f"{'it' if len(bad) == 1 else 'them'} at A1111's default")
        name = self.sampler_name or self.sampler_index
        scheduler = None
        if name:
            scheduler = SAMPLERS.get(name.strip().lower())
            if scheduler is None:
                raise InvalidRequest(f"sampler_name {name!r} is not served; choose 'DDIM' or 'DPM++ 2M'")
        for field, value in (("batch_size", self.batch_size), ("n_iter", self.n_iter)):
            if value < 1:
                raise InvalidRequest(f"{field} must be at least 1; got {value}")
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, identity=self.identity, method=self.method,
            scale=self.scale, scale_start=self.scale_start, scale_end=self.scale_end, steps=self.steps,
            guidance=self.cfg_scale, seed=None if self.seed == -1 else self.seed, width=self.width,
            height=self.height, n=self.batch_size * self.n_iter, output_format="png", scheduler=scheduler,
            timeout_s=self.timeout_s,
        )


def sampler_label(scheduler: str) -> str:
    return {"ddim": "DDIM", "dpm++2m": "DPM++ 2M"}.get(scheduler, scheduler)


def txt2img_body(body: Txt2ImgBody, result: GenerationResult, version: str) -> dict[str, Any]:
    r = result.request
    seeds = [img.seed for img in result.images]
    sampler = sampler_label(r.scheduler)
    extra = {"pidrt_identity": r.identity, "pidrt_method": r.method, "pidrt_scale": r.scale,
             "pidrt_backend": result.backend}
    infotexts = []
    for seed in seeds:
        line = (f"Steps: {r.steps}, Sampler: {sampler}, CFG scale: {r.guidance:g}, Seed: {seed}, "
                f"Size: {r.width}x{r.height}, Model: pidrt")
        if r.identity:
            line += f", Identity: {r.identity}, Identity scale: {r.scale:g}"
        infotexts.append(f"{r.prompt}\nNegative prompt: {r.negative_prompt}\n{line}")
    info = {
        "prompt": r.prompt, "all_prompts": [r.prompt] * len(seeds),
        "negative_prompt": r.negative_prompt, "all_negative_prompts": [r.negative_prompt] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": r.width, "height": r.height, "sampler_name": sampler,
        "cfg_scale": r.guidance, "steps": r.steps, "batch_size": body.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": "pidrt", "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": 0,
        "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(result.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"pidrt {version}",
    }
    images = [base64.b64encode(img.data).decode("ascii") for img in result.images] if body.send_images else []
    return {"images": images, "parameters": body.model_dump(), "info": json.dumps(info)}


def install_a1111_routes(app: FastAPI, service, version: str) -> None:
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgBody, request: Request):
        result = await service.generate(body.to_request(), request.is_disconnected)
        return txt2img_body(body, result, version)

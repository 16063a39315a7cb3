"""The request fields of a Layout-and-Retouch generation (mode "retouch"), validated at the edge.

A `GenerationRequest` with `mode="retouch"` carries a `RetouchRequest`: k (the layout steps), the
swap and blend steps, the subject for the mask (words of the prompt or token positions), an
optional foreground mask of the layout image and whether the layout image comes back too.
`resolve_retouch` turns it into a `ResolvedRetouch` (a `RetouchConfig` + `RetouchOptions`) or
refuses it with `InvalidRequest` (HTTP 400, CLI exit 2). Steps left out take the published
values (k = 5, swap from 4, reference from 10, blend with the reference, all of 50 steps:
docs/retouch.md) scaled to the request's step count.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.retouch import RetouchConfig
from pidrt.runtime.retouch import RetouchOptions

MODES = ("generate", "retouch")
LAYOUT_PATHS = ("inversion", "recorded")
PUBLISHED_STEPS = 50  # the schedule RetouchConfig's defaults are given for


@dataclass(frozen=True)
class RetouchRequest:
    """What a caller may set (None: the default scaled to the request's steps).

    subject: words of the prompt ("dog", "young man") or their token positions (1 = first word).
    mask: the subject's binary foreground mask of the layout image, width x height: PNG/JPEG
      bytes (pixels > 127 are foreground) or a [H, W] tensor of 0 and 1 (the paper's SAM mask).
    layout_path: "inversion" (the paper's: the layout image is inverted) or "recorded" (stage 1's
      trajectory is kept: T fewer UNet calls, torch UNet only).
    """

    subject: str | Sequence[int] | None = None
    layout_steps: int | None = None
    swap_start: int | None = None
    reference_start: int | None = None
    blend_start: int | None = None
    mask: bytes | torch.Tensor | None = None
    return_layout: bool = False
    layout_path: str = "inversion"


@dataclass(frozen=True)
class ResolvedRetouch:
    config: RetouchConfig
    options: RetouchOptions
    subject: str | tuple[int, ...]
    mask: torch.Tensor | None = field(default=None, compare=False)  # binary [H, W] float32
    return_layout: bool = False

    @property
    def plan_key(self) -> tuple:
        """Retouch requests share UNet calls only with their own plan (steps, layers, paths)."""
        return ("retouch", self.config, self.options)

    def as_dict(self) -> dict:
        c = self.config
        return {"layout_steps": c.layout_steps, "swap_start": c.swap_start, "reference_start": c.reference_start,
                "blend_start": c.blend_from, "subject": self.subject if isinstance(self.subject, str)
                else list(self.subject), "mask": self.mask is not None, "return_layout": self.return_layout,
                "layout_path": self.options.layout}


def resolve_retouch(mode: str | None, retouch: RetouchRequest | None, *, steps: int, width: int, height: int,
                    scheduler: str, identity: str | None) -> ResolvedRetouch | None:
    """None for a plain generation; InvalidRequest for a retouch that cannot run."""
    from pidrt.runtime.requests import InvalidRequest

    mode = mode or "generate"
    if mode not in MODES:
        raise InvalidRequest(f"mode must be one of {list(MODES)}; got {mode!r}")
    if mode == "generate":
        if retouch is not None:
            raise InvalidRequest("retouch fields are for mode 'retouch'")
        return None
    if not isinstance(retouch, RetouchRequest):
        retouch = RetouchRequest() if retouch is None else _from_mapping(retouch)
    if identity is None:
        raise InvalidRequest("mode 'retouch' needs an identity: its cached reference path puts the identity back")
    if scheduler != "ddim":
        raise InvalidRequest(f"mode 'retouch' follows DDIM trajectories; use scheduler 'ddim', not {scheduler!r}")
    if retouch.layout_path not in LAYOUT_PATHS:
        raise InvalidRequest(f"layout_path must be one of {list(LAYOUT_PATHS)}; got {retouch.layout_path!r}")
    if not isinstance(retouch.return_layout, bool):
        raise InvalidRequest(f"return_layout must be true or false; got {retouch.return_layout!r}")
    config = _config(retouch, steps)
    return ResolvedRetouch(config, RetouchOptions(retouch.layout_path, "cached"), _subject(retouch.subject),
                           _mask(retouch.mask, width, height), retouch.return_layout)


def _from_mapping(value) -> RetouchRequest:
    from pidrt.runtime.requests import InvalidRequest

    names = {f.name for f in dataclasses.fields(RetouchRequest)}
    if not isinstance(value, dict) or set(value) - names:
        raise InvalidRequest(f"retouch must be an object with fields among {sorted(names)}; got {value!r}")
    return RetouchRequest(**value)


def _config(req: RetouchRequest, steps: int) -> RetouchConfig:
    from pidrt.runtime.requests import InvalidRequest

    base = RetouchConfig()

    def value(name: str, given, default: int) -> int:
        if given is None:
            return round(default * steps / PUBLISHED_STEPS)
        if isinstance(given, bool) or not isinstance(given, int):
            raise InvalidRequest(f"{name} must be an integer; got {given!r}")
        return given

    reference = value("reference_start", req.reference_start, base.reference_start)
    blend = req.blend_start
    if blend is not None:
        blend = value("blend_start", blend, 0)
    elif reference < 1:  # left out: with the reference, but a step's mask needs the step before's maps
        blend = 1
    config = dataclasses.replace(base, layout_steps=value("layout_steps", req.layout_steps, base.layout_steps),
                                 swap_start=value("swap_start", req.swap_start, base.swap_start),
                                 reference_start=reference, blend_start=blend)
    try:
        config.check(steps)
    except PidrtError as exc:
        raise InvalidRequest(f"retouch: {exc}") from None
    return config


def _subject(subject) -> str | tuple[int, ...]:
    from pidrt.runtime.requests import InvalidRequest

    if isinstance(subject, str) and subject.strip():
        return subject.strip()
    if isinstance(subject, (list, tuple)) and subject and all(
            isinstance(p, int) and not isinstance(p, bool) for p in subject):
        return tuple(subject)
    raise InvalidRequest("retouch needs the subject for its mask: words of the prompt (e.g. \"man\") or their "
                         f"token positions; got {subject!r}")


def _mask(mask, width: int, height: int) -> torch.Tensor | None:
    from pidrt.runtime.requests import InvalidRequest

    if mask is None:
        return None
    if isinstance(mask, (bytes, bytearray)):
        import numpy as np
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(mask))
            image.load()
        except Exception as exc:  # PIL raises several kinds for a bad file
            raise InvalidRequest(f"the retouch mask is not a readable image ({type(exc).__name__})") from None
        mask = torch.from_numpy((np.asarray(image.convert("L")) > 127).astype(np.float32))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise InvalidRequest("the retouch mask must be an image or a [height, width] tensor")
    if tuple(mask.shape) != (height, width):
        raise InvalidRequest(f"the retouch mask must be {width}x{height} (the image's size); "
                             f"got {mask.shape[1]}x{mask.shape[0]}")
    mask = mask.detach().float().cpu()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidRequest("the retouch mask must be binary (0 and 1)")
    return mask


def subject_positions(tokenizer, prompt: str, subject: str | tuple[int, ...]) -> tuple[int, ...]:
    """The token positions of `subject` in `prompt` (every occurrence); positions are checked."""
    from pidrt.runtime.requests import InvalidRequest

    length = tokenizer.length
    if not isinstance(subject, str):
        bad = [p for p in subject if not 0 < p < length - 1]
        if bad:
            raise InvalidRequest(f"retouch subject token positions must be in 1..{length - 2}; got {bad}")
        return subject
    words, want = tokenizer.words(prompt)[: length - 2], tokenizer.words(subject)
    found = [1 + i + j for i in range(len(words) - len(want) + 1) if words[i:i + len(want)] == want
             for j in range(len(want))]
    if not want or not found:
        raise InvalidRequest(f"the retouch subject {subject!r} is not in the prompt (its mask comes from the "
                             "prompt's attention to those words)")
    return tuple(dict.fromkeys(found))

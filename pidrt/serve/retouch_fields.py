"""The HTTP API's retouch fields: the `retouch` object of a generation body and what an image adds.

    {"prompt": "a photo of a man on a beach", "identity": "ip-…", "mode": "retouch",
     "retouch": {"subject": "man", "layout_steps": 5, "mask": "<base64 PNG>", "return_layout": true}}

Types are checked here; ranges, sizes and the identity's cached reference by the generator
(`pidrt.runtime.retouch_requests`), with the messages a Python caller gets.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from pidrt.runtime.requests import InvalidRequest
from pidrt.runtime.retouch_requests import RetouchRequest


class RetouchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: Union[StrictStr, list[StrictInt]] | None = Field(
        None, description="words of the prompt (or their token positions) whose attention makes the mask")
    layout_steps: StrictInt | None = Field(None, description="k: steps with the identity branch off (stage 1)")
    swap_start: StrictInt | None = None
    reference_start: StrictInt | None = None
    blend_start: StrictInt | None = None
    mask: StrictStr | None = Field(None, description="base64 PNG/JPEG: the subject's foreground in the layout image")
    return_layout: StrictBool = False
    layout_path: StrictStr = "inversion"

    def to_request(self) -> RetouchRequest:
        mask = None
        if self.mask is not None:
            try:
                mask = base64.b64decode(self.mask, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest("retouch.mask must be a base64-encoded image") from None
        fields = self.model_dump(exclude={"mask"})
        if isinstance(fields["subject"], list):
            fields["subject"] = tuple(fields["subject"])
        return RetouchRequest(**fields, mask=mask)


def image_fields(image) -> dict[str, Any]:
    """A result image's retouch extras: the layout image (base64) and the UNet calls of its batch."""
    out: dict[str, Any] = {}
    if image.layout is not None:
        out["layout_b64_json"] = base64.b64encode(image.layout).decode("ascii")
    if image.unet_calls is not None:
        out["unet_calls"] = dict(image.unet_calls)
    return out

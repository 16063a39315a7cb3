"""`pidrt demo`: the whole path on the `tiny` preset, offline, on CPU in well under a minute.

Enrolls a real face photo that ships inside an installed package as an identity for each method
(SCA, IP-Adapter, EAA), generates with each and with none, and writes the images and
`report.json`: seconds per stage and the max abs difference between the folded and the
unfolded (papers') form of the few-token branches. Weights are seeded random: the images show
that the machinery runs end to end, not what a trained model draws.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pidrt.errors import PidrtError
from pidrt.identity.enroll import Enroller, EnrollOptions
from pidrt.identity.store import IdentityStore
from pidrt.models.branches import IPIdentity, SCAIdentity, few_token_payloads
from pidrt.models.presets import TINY
from pidrt.runtime.conditioning import ScaleSchedule
from pidrt.runtime.encoding import encode_image
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig
from pidrt.runtime.setup import RuntimeOptions, build_runtime


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("pidrt-demo")
    steps: int = 10
    guidance: float = 5.0
    seed: int = 42
    prompt: str = "a portrait photo of a person, studio light"
    scale: float = 0.6


def sample_face_photo() -> tuple[bytes, str]:
    """A real photo shipped inside an installed package (nothing is downloaded).

    scikit-image's astronaut (one frontal face) first; insightface's t1.jpg (six people, the
    largest face is enrolled) when scikit-image is absent.
    """
    try:
        import io

        from PIL import Image
        from skimage import data

        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buf, format="PNG")
        return buf.getvalue(), "skimage.data.astronaut"
    except ImportError:
        pass
    try:
        import insightface

        path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
        if path.is_file():
            return path.read_bytes(), f"insightface/data/images/{path.name}"
    except ImportError:
        pass
    raise PidrtError("the demo needs a face photo from scikit-image or insightface: pip install 'pidrt[face]'")


def folded_vs_unfolded(pipe: Pipeline, item) -> float:
    """Max abs difference of one UNet call with the folded and the unfolded branch (same inputs)."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, pipe.models.preset.unet.sample_size, pipe.models.preset.unet.sample_size)
    x, ctx = torch.randn(shape, generator=g), pipe.encode_text(["a photo"])
    outs = []
    for folded in (True, False):
        pipe.state.layers = few_token_payloads(pipe.models.unet, pipe.layers, [item], folded)
        pipe.state.scale = torch.ones(1)
        outs.append(pipe.unet(x, 500, ctx))
    pipe.state.clear()
    return float((outs[0] - outs[1]).abs().max())


def run_demo(config: DemoConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    clock = time.perf_counter()
    pipe, encoders = build_runtime(RuntimeOptions(preset="tiny"))
    stages["load_models_s"] = time.perf_counter() - clock
    photo, photo_name = sample_face_photo()
    enroller = Enroller(pipe, IdentityStore(out / "store"), encoders)
    sampling = SamplingConfig(steps=config.steps, guidance=config.guidance, height=TINY.resolution, width=TINY.resolution)

    report: dict = {"preset": TINY.name, "photo": photo_name, "device": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "steps": config.steps, "identities": {}, "images": {}}
    conditions = {"none": None}
    for method in ("sca", "ip", "eaa"):
        enrolled = enroller.enroll([photo], EnrollOptions(method, steps=config.steps))
        stages[f"enroll_{method}_s"] = enrolled.seconds
        conditions[method] = enroller.condition(enrolled.identity_id)
        report["identities"][method] = {"id": enrolled.identity_id, "created": enrolled.created}

    for method, condition in conditions.items():
        spec = ImageSpec(config.prompt, config.seed, condition=condition, schedule=ScaleSchedule(config.scale))
        result = pipe.generate(sampling, [spec])
        for stage, seconds in result.timings.items():
            stages[f"generate_{method}_{stage}"] = seconds
        path = out / f"{method}.png"
        pixels = (result.images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path.write_bytes(encode_image(pixels, "png"))
        report["images"][method] = path.name

    tokens = {m: enroller.store.get(report["identities"][m]["id"])[0]["tokens.cond"] for m in ("sca", "ip")}
    report["folded_vs_unfolded_max_abs"] = {
        "sca": folded_vs_unfolded(pipe, SCAIdentity(encoders.sca, tokens["sca"])),
        "ip": folded_vs_unfolded(pipe, IPIdentity(encoders.ip, tokens["ip"])),
    }
    report["stages_s"] = {k: round(v, 4) for k, v in stages.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report

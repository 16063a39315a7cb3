"""`pidrt demo`: the whole path on the `tiny` preset, offline, on CPU in well under a minute.

Enrolls a face photo (`--face`, or a real photo that ships inside an installed package) as an
identity for each method (SCA, IP-Adapter, EAA) at each method's default strength, generates
with each and with none, and writes the images and `report.json`: the photo, the face detector
that ran, the prompt, seed and scales, the device, seconds per stage and the max abs difference
between the folded and the unfolded (papers') form of the few-token branches. Weights are
seeded random: the images are noise, and what differs between them is the identity branches at
work, not what a trained model draws.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pidrt.bench.env import device_info
from pidrt.errors import PidrtError
from pidrt.identity.enroll import Enroller, EnrollOptions
from pidrt.identity.faces import load_image
from pidrt.identity.store import IdentityStore
from pidrt.models.branches import IPIdentity, SCAIdentity, few_token_payloads
from pidrt.models.presets import TINY
from pidrt.models.conditions import ScaleSchedule
from pidrt.runtime.encoding import encode_image
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig
from pidrt.runtime.requests import method_scales
from pidrt.runtime.setup import RuntimeOptions, build_runtime


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("pidrt-demo")
    steps: int = 10
    guidance: float = 5.0
    seed: int = 42
    prompt: str = "a portrait photo of a person, studio light"
    scale: float | None = None  # None: each method's default strength (runtime.requests.method_scales)
    face: Path | None = None  # the photo to enroll; None: a sample photo shipped in an installed package
    detector: str = "auto"

    def __post_init__(self):
        """Everything is checked here, before a model is loaded or a folder made."""
        from pidrt.identity.faces import BACKENDS
        from pidrt.runtime.requests import MAX_SEED

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PidrtError(f"steps must be at least 1; got {self.steps!r}")
        if not 0 <= self.guidance <= 30 or not 0 <= self.seed <= MAX_SEED:
            raise PidrtError(f"guidance must be in 0..30 and seed in 0..{MAX_SEED}")
        if self.scale is not None and not 0 <= self.scale <= 4:
            raise PidrtError(f"scale must be in 0..4; got {self.scale}")
        if self.detector not in BACKENDS:
            raise PidrtError(f"unknown face detector {self.detector!r}; choose one of {list(BACKENDS)}")
        if self.face is not None and not Path(self.face).is_file():
            raise PidrtError(f"{self.face}: no such image file")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise PidrtError(f"output folder {self.out} is a file, not a folder")


NOTE = ("the tiny preset runs seeded random weights, so every image is noise; what differs between "
        "none.png and sca.png / ip.png / eaa.png is the identity branch at work")


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
    """Run the demo into `config.out`; a folder this call made is removed again if it fails."""
    out = Path(config.out)
    if config.face is not None:
        photo, photo_name = Path(config.face).read_bytes(), str(config.face)
    else:
        photo, photo_name = sample_face_photo()
    load_image(photo, name=photo_name)  # an unreadable photo fails before anything is built
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _run(config, out, photo, photo_name)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(config: DemoConfig, out: Path, photo: bytes, photo_name: str) -> dict:
    stages: dict[str, float] = {}
    clock = time.perf_counter()
    pipe, encoders = build_runtime(RuntimeOptions(preset="tiny"))
    stages["load_models_s"] = time.perf_counter() - clock
    enroller = Enroller(pipe, IdentityStore(out / "store"), encoders)
    sampling = SamplingConfig(steps=config.steps, guidance=config.guidance, height=TINY.resolution, width=TINY.resolution)
    scales = method_scales(encoders)

    report: dict = {"preset": TINY.name, "photo": photo_name, "device": device_info(torch.device(pipe.device))["name"],
                    "torch": torch.__version__, "prompt": config.prompt, "seed": config.seed, "steps": config.steps,
                    "guidance": config.guidance, "note": NOTE, "identities": {}, "images": {}}
    conditions = {"none": None}
    for method in ("sca", "ip", "eaa"):
        enrolled = enroller.enroll([photo], EnrollOptions(method, steps=config.steps, detector=config.detector,
                                                          names=(photo_name,)))
        stages[f"enroll_{method}_s"] = enrolled.seconds
        conditions[method] = enroller.condition(enrolled.identity_id)
        scale = scales[method] if config.scale is None else config.scale
        report["identities"][method] = {"id": enrolled.identity_id, "created": enrolled.created,
                                        "face_detector": enrolled.detector, "scale": scale}

    for method, condition in conditions.items():
        scale = report["identities"][method]["scale"] if condition is not None else 0.0
        spec = ImageSpec(config.prompt, config.seed, condition=condition, schedule=ScaleSchedule(scale))
        result = pipe.generate(sampling, [spec])
        for stage, seconds in result.timings.items():
            stages[f"generate_{method}_{stage}"] = seconds
        path = out / f"{method}.png"
        pixels = (result.images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path.write_bytes(encode_image(pixels, "png"))
        report["images"][method] = path.name
    report["face_detector"] = report["identities"]["sca"]["face_detector"]

    tokens = {m: enroller.store.get(report["identities"][m]["id"])[0]["tokens.cond"] for m in ("sca", "ip")}
    report["folded_vs_unfolded_max_abs"] = {
        "sca": folded_vs_unfolded(pipe, SCAIdentity(encoders.sca, tokens["sca"])),
        "ip": folded_vs_unfolded(pipe, IPIdentity(encoders.ip, tokens["ip"])),
    }
    report["stages_s"] = {k: round(v, 4) for k, v in stages.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report

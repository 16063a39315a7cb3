"""The identities the generation cases run with, and the mixed batches they are put in.

Two identities per method are enrolled the way a user enrolls them (`Enroller`, a real face
photo shipped with scikit-image / insightface and its mirror image) for the generation's step
count and resolution. A batch of size B mixes them with no-identity elements: element k carries
identity (k // 2) mod 2 when k is even and none when k is odd, so B=1 is one identity, B=2 is
[id0, none], B=4 is [id0, none, id1, none]; method `none` has no identity anywhere.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pidrt.errors import PidrtError
from pidrt.identity.enroll import Encoders, Enroller, EnrollOptions
from pidrt.identity.store import IdentityStore
from pidrt.models.conditions import Condition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, Pipeline


def face_photos() -> list[tuple[bytes, str]]:
    """The demo's real photo and its mirror image (two distinct identities' inputs, same face size)."""
    from PIL import Image

    from pidrt.runtime.demo import sample_face_photo

    photo, name = sample_face_photo()
    flipped = io.BytesIO()
    Image.open(io.BytesIO(photo)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="PNG")
    return [(photo, name), (flipped.getvalue(), name + " (mirrored)")]


def random_weights(pipe: Pipeline) -> bool:
    return str(pipe.models.name).startswith("random:")


def encoders_for_resolution(pipe: Pipeline, encoders: Encoders, resolution: int, seed: int) -> Encoders:
    """`encoders` with an EAA adapter sized for `resolution` (a new random one beside random weights).

    EAA's cross-layer token aggregation is sized for one latent side, so an adapter file serves
    one resolution; with the preset's random weights a random adapter of the right size is made.
    """
    from pidrt.models.adapters import EAAAdapter

    latent = resolution // pipe.models.preset.latent_scale
    eaa = encoders.eaa
    if eaa is not None and eaa.latent_size != latent and random_weights(pipe):
        n_levels = len(pipe.models.preset.unet.block_out_channels)
        eaa = EAAAdapter.random(pipe.layers, latent, n_levels, s_c=eaa.s_c, seed=seed)
    return dataclasses.replace(encoders, eaa=eaa)


@dataclass
class Identities:
    conditions: dict[str, list[Condition]] = field(default_factory=dict)  # method -> [id0, id1]
    ids: dict[str, list[str]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # method -> why it cannot run
    photos: list[str] = field(default_factory=list)
    encoders: Encoders | None = None
    ip_embeds: list[torch.Tensor] | None = None  # IP-Adapter image embeddings (the diffusers baseline's input)


def identities_needed(batch_sizes) -> int:
    """How many distinct identities the mixed batches use (1 up to B=2, else 2)."""
    return 1 + any(element_identity(k, 2) == 1 for k in range(max(batch_sizes)))


def enroll_identities(pipe: Pipeline, encoders: Encoders, methods, steps: int, height: int, width: int,
                      seed: int, store_dir: Path | None = None, n_identities: int = 2) -> Identities:
    try:
        photos = face_photos()[:n_identities]
    except PidrtError as exc:  # no photo shipped with an installed package: no identity method can run
        return Identities(unavailable={m: str(exc) for m in methods if m != "none"}, encoders=encoders)
    out = Identities(photos=[name for _, name in photos])
    if height != width and "eaa" in methods:
        out.unavailable["eaa"] = f"EAA identities are enrolled on square crops; {height}x{width} is not square"
    encoders = encoders_for_resolution(pipe, encoders, height, seed) if height == width else encoders
    out.encoders = encoders
    root = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="pidrt-bench-ids-"))
    enroller = Enroller(pipe, IdentityStore(root), encoders)
    for method in methods:
        if method == "none" or method in out.unavailable:
            continue
        try:
            opts = EnrollOptions(method, steps=steps, resolution=height if method == "eaa" else None)
            ids = [enroller.enroll([data], opts).identity_id for data, _ in photos]
            out.ids[method] = ids
            out.conditions[method] = [enroller.condition(i) for i in ids]
        except PidrtError as exc:
            out.unavailable[method] = f"enrollment failed: {exc}"
    if "ip" in out.conditions:
        try:
            out.ip_embeds = [e.float() for e in enroller.ip_embeddings([data for data, _ in photos], EnrollOptions("ip"))]
        except PidrtError as exc:
            out.unavailable["ip_baseline"] = f"no IP-Adapter image embedding for the diffusers baseline: {exc}"
    return out


def element_identity(k: int, n_identities: int) -> int | None:
    """Which identity batch element k carries (None: no identity); see the module docstring."""
    if n_identities == 0 or k % 2:
        return None
    return (k // 2) % n_identities


def batch_specs(batch: int, conditions: list[Condition] | None, prompt: str, seed: int, scale: float
                ) -> list[ImageSpec]:
    conditions = conditions or []
    specs = []
    for k in range(batch):
        which = element_identity(k, len(conditions))
        if which is None:
            specs.append(ImageSpec(prompt, seed + k))
        else:
            specs.append(ImageSpec(prompt, seed + k, condition=conditions[which], schedule=ScaleSchedule(scale)))
    return specs

"""The retouch's reference path, cached with the identity (docs/retouch.md, "Serving").

Layout-and-Retouch's reference path is the identity's reference image's DDIM trajectory; from
`reference_start` on, the target path's edited self-attention layers read its K/V. Enrolling
with `retouch=True` records it once per identity (DDIM inversion + reconstruction of the first
reference's face crop, 2T UNet calls: `pidrt.runtime.retouch.reference_path`, what EAA
enrollment records) and keeps, per step and edited layer, the recorded inputs projected through
the UNet's own to_k / to_v. A retouch generation then spends no UNet call on that path.

Entries live in a store of their own, `<store>/retouch-reference/`, under the identity's own key
and id, with the identity store's schema-2 integrity: payload and metadata hashes verified on
every load. A corrupt entry is reported and never used (the request is refused, naming the fix),
and the next enrollment with `retouch=True` rebuilds it. Listing identities does not show these
entries; deleting an identity deletes its reference (`discard`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pidrt.errors import FormatError, PidrtError
from pidrt.identity.store import CorruptEntryError, IdentityKey, IdentityStore, UnknownIdentityError

log = logging.getLogger(__name__)

FOLDER = "retouch-reference"


class ReferenceUnavailable(PidrtError):
    """No usable cached reference path for an identity (none recorded, corrupt, or another schedule)."""


@dataclass(frozen=True)
class CachedReference:
    """What a load gives: the path and the schedule it was recorded for."""

    path: object  # pidrt.runtime.retouch.ReferencePath
    steps: int
    resolution: int
    layers: tuple[str, ...]


def to_tensors(path, index: dict[str, int], resolution: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ReferencePath -> the store's flat tensors and metadata (layers keyed by processor index)."""
    names = tuple(path.kv[0])
    out = {f"step{t}.{index[n]}.{p}": kv[n][j] for t, kv in enumerate(path.kv) for n in names
           for j, p in enumerate("kv")}
    out["latent_t"] = path.latent_t
    meta = {"steps": str(len(path.kv)), "resolution": str(resolution), "caption": path.caption,
            "layers": json.dumps(names)}
    return out, meta


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], index: dict[str, int]) -> CachedReference:
    from pidrt.runtime.retouch import ReferencePath

    try:
        steps, names = int(meta["steps"]), tuple(json.loads(meta["layers"]))
        kv = [{n: (tensors[f"step{t}.{index[n]}.k"], tensors[f"step{t}.{index[n]}.v"]) for n in names}
              for t in range(steps)]
        path = ReferencePath(meta["caption"], tensors["latent_t"], kv)
        return CachedReference(path, steps, int(meta["resolution"]), names)
    except (KeyError, ValueError) as exc:
        raise FormatError(f"retouch reference entry is missing {exc}; it was made for another UNet") from None


class ReferenceStore:
    """The cached reference paths beside an identity store (see the module docstring)."""

    def __init__(self, identities: IdentityStore):
        self.store = IdentityStore(identities.root / FOLDER)

    def ensure(self, key: IdentityKey, wanted: dict[str, str],
               build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]]) -> bool:
        """Keep a reference for the identity `key` whose metadata has `wanted`'s values (steps,
        resolution, caption, layers); build it on a miss, a corrupt entry or another schedule.
        Returns whether it was built."""
        _, _, meta, created = self.store.get_or_create(key, build)
        if not created and any(meta.get(k) != v for k, v in wanted.items()):
            log.info("retouch reference of %s was recorded for %s; recording it for %s", key.id,
                     {k: meta.get(k) for k in wanted}, wanted)
            self.store.put(key, *build())
            created = True
        return created

    def load(self, identity_id: str, layers: Sequence) -> CachedReference:
        """The identity's verified reference path; ReferenceUnavailable saying why and how to fix it."""
        fix = "enroll the identity again with retouch=True (pidrt enroll --retouch, POST /v1/identities retouch=true)"
        try:
            tensors, meta = self.store.get(identity_id)
        except UnknownIdentityError:
            raise ReferenceUnavailable(f"identity {identity_id} has no cached retouch reference; {fix}") from None
        except CorruptEntryError as exc:
            log.warning("retouch reference %s is corrupt (%s); not using it", exc.path, exc.reason)
            raise ReferenceUnavailable(f"the cached retouch reference of {identity_id} failed verification "
                                       f"({exc.reason}); {fix} to rebuild it") from None
        return from_tensors(tensors, meta, {layer.name: layer.index for layer in layers})

    def discard(self, identity_id: str) -> None:
        """Remove the reference of an identity that is gone (nothing if there is none)."""
        try:
            self.store.delete(identity_id)
        except UnknownIdentityError:
            pass


def record_reference(enroller, key: IdentityKey, images: Sequence[bytes], opts, blocks: tuple[int, int],
                     inversion=None) -> bool:
    """Record (or find) the retouch reference of the identity `key` from its first photo's face
    crop at opts.resolution, with opts.caption over opts.steps steps. Returns whether it was built.

    inversion: EAA enrollment's `Inversion` of that crop (reconstruction pass, same caption and
    steps), whose recorded attn1 inputs are the reference path's: no UNet call here then."""
    import numpy as np
    from PIL import Image

    from pidrt.models.retouch import RetouchConfig, swap_layers
    from pidrt.runtime.retouch import reference_path

    pipe = enroller.pipe
    refusal = getattr(pipe, "record_unavailable", None)
    if refusal:  # a lean engine server has no torch UNet to record with
        raise PidrtError(refusal)
    side = enroller._resolution(opts)
    names = [layer.name for layer in swap_layers(pipe.layers, RetouchConfig(start_layer=blocks[0], end_layer=blocks[1]))]
    wanted = {"steps": str(opts.steps), "resolution": str(side), "caption": opts.caption, "layers": json.dumps(names)}

    def build():
        if inversion is not None:
            path = reference_path(pipe, None, opts.caption, opts.steps, names, inversion)
        else:
            crop = enroller._faces(list(images[:1]), opts, "face512")[0]
            pixels = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS), np.float32)
            x = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None]
            path = reference_path(pipe, pipe.encode_image(x), opts.caption, opts.steps, names)
        return to_tensors(path, {layer.name: layer.index for layer in pipe.layers}, side)

    return ReferenceStore(enroller.store).ensure(key, wanted, build)

"""Enrollment: face photos in, a cached identity artifact out (done once, used by every generation).

SCA: FFHQ-aligned crop -> e4e W+ (averaged over references) -> F(w), F(0) -> folded A/B.
IP-Adapter: face crop -> CLIP image embedding (or ArcFace for FaceID) -> tokens -> folded A/B.
EAA: square face crop -> VAE latent -> DDIM inversion + reconstruction with feature recording
-> projected K/V per step and layer. The store keys each artifact by everything it depends on.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pidrt.errors import PidrtError
from pidrt.identity import faces
from pidrt.identity.artifacts import (
    concat_references,
    eaa_from_tensors,
    eaa_to_tensors,
    folded_from_tensors,
    folded_to_tensors,
)
from pidrt.identity.device_cache import DeviceCache
from pidrt.identity.e4e import E4EEncoder, aggregate, image_to_tensor
from pidrt.identity.image_encoder import ClipImageEncoder
from pidrt.identity.token_store import import_token_bytes, stored_tokens
from pidrt.identity.store import (
    IdentityKey,
    IdentityStore,
    fingerprint_module,
    fingerprint_tensors,
)
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter
from pidrt.models.branches import IPIdentity, SCAIdentity, few_token_payloads
from pidrt.models.image_proj import MLPProjModel
from pidrt.models.conditions import Condition, FoldedCondition
from pidrt.models.tokens import TokenIdentity
from pidrt.runtime.inversion import eaa_features, invert_and_record
from pidrt.runtime.pipeline import Pipeline

METHODS = ("sca", "ip", "eaa")
_DETECTORS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("pidrt_enroll_detectors", default=None)


@dataclass(frozen=True)
class EnrollOptions:
    method: str
    steps: int = 50  # EAA: the sampling step count the features are recorded for
    resolution: int | None = None  # EAA: image side; None = the preset's
    caption: str = "a photo of a person"  # EAA: the inversion prompt P_inv
    record_from: str = "reconstruction"  # EAA: "reconstruction" (paper) or "inversion" (T calls)
    face_policy: str = "largest"
    detector: str = "auto"
    reference_weights: tuple[float, ...] | None = None  # SCA/IP: weighted average of references
    # What errors call each image (file names, upload names); not part of the identity's key.
    names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise PidrtError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PidrtError(f"steps must be a positive integer; got {self.steps!r}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 8 or self.resolution % 8):
            raise PidrtError(f"resolution must be a positive multiple of 8 (or None: the preset's); got {self.resolution!r}")

    def name(self, n: int) -> str:
        return self.names[n] if self.names and n < len(self.names) else f"reference {n + 1}"


@dataclass
class Encoders:
    """What enrollment needs besides the pipeline; only the chosen method's parts must be set."""

    sca: SCAAdapter | None = None
    e4e: E4EEncoder | None = None
    ip: IPAdapterWeights | None = None
    image_encoder: ClipImageEncoder | None = None
    arcface_pack: str | None = None
    eaa: EAAAdapter | None = None


@dataclass
class Enrollment:
    identity_id: str
    method: str
    created: bool
    seconds: float
    detector: str | None = None  # the face detector(s) that ran when the entry was built


def base_fingerprint(models) -> str:
    """sha256 of the base model's weights (UNet, text encoder, VAE): part of every identity key."""
    return fingerprint_tensors(
        {f"{part}.{k}": v for part, mod in (("unet", models.unet), ("text", models.text_encoder), ("vae", models.vae))
         for k, v in mod.state_dict().items()}
    )


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # delay: short enrollments stay quiet, long ones (EAA inversion) show progress.
    return tqdm(total=total, desc=desc, delay=1.0, leave=False)


class Enroller:
    """Enrolls identities into `store` and turns stored identities back into conditions.

    With a `device_cache`, conditions are built over artifacts kept on the pipeline's device
    within a byte budget, so a warm identity costs neither a store read nor a host copy.
    `base_fp`: the base fingerprint, when the pipeline no longer holds the torch weights (lean
    engine servers compute it before dropping them).
    """

    def __init__(self, pipe: Pipeline, store: IdentityStore, encoders: Encoders,
                 device_cache: DeviceCache | None = None, base_fp: str | None = None):
        self.pipe, self.store, self.encoders = pipe, store, encoders
        self.device_cache = device_cache
        self._meta: dict[str, dict[str, str]] = {}  # small, so kept for every identity loaded
        self._base_fp = base_fp
        self._fingerprints: dict[int, str] = {}  # id(module or adapter) -> sha256; weights do not change

    def _fingerprint(self, obj) -> str:
        if id(obj) not in self._fingerprints:
            if isinstance(obj, ClipImageEncoder):
                obj = obj.model
            self._fingerprints[id(obj)] = (fingerprint_module(obj) if isinstance(obj, torch.nn.Module)
                                           else fingerprint_tensors(obj.tensors()))
        return self._fingerprints[id(obj)]

    def base_fingerprint(self) -> str:
        if self._base_fp is None:
            self._base_fp = base_fingerprint(self.pipe.models)
        return self._base_fp

    def _adapter(self, method: str):
        adapter = {"sca": self.encoders.sca, "ip": self.encoders.ip, "eaa": self.encoders.eaa}[method]
        if adapter is None:
            raise PidrtError(f"no {method} adapter loaded; pass one to enroll with --method {method}")
        return adapter

    def _key(self, images: Sequence[bytes], opts: EnrollOptions) -> IdentityKey:
        e = self.encoders
        params: dict = {"face_policy": opts.face_policy, "detector": opts.detector}
        if opts.method == "eaa":
            params |= {"scheduler": "ddim", "steps": opts.steps, "resolution": self._resolution(opts),
                       "caption": opts.caption, "record_from": opts.record_from}
        else:
            params["weights"] = list(opts.reference_weights or [])
            encoder = e.e4e if opts.method == "sca" else e.image_encoder
            params["encoder"] = self._fingerprint(encoder) if encoder is not None else str(e.arcface_pack)
        adapter_fp = self._fingerprint(self._adapter(opts.method))
        return IdentityKey.make(images, opts.method, self.base_fingerprint(), adapter_fp, **params)

    def _resolution(self, opts: EnrollOptions) -> int:
        return opts.resolution or self.pipe.models.preset.resolution

    def enroll(self, images: Sequence[bytes], opts: EnrollOptions) -> Enrollment:
        if not images:
            raise PidrtError("enrollment needs at least one face image")
        refusal = getattr(self.pipe, "record_unavailable", None)
        if opts.method == "eaa" and refusal:
            raise PidrtError(refusal)
        clock = time.perf_counter()
        key = self._key(images, opts)
        ident, _, meta, created = self.store.get_or_create(key, lambda: self._build(images, opts))
        return Enrollment(ident, opts.method, created, time.perf_counter() - clock, meta.get("face_detector"))

    def enroll_tokens(self, data: bytes, name: str = "tokens", placeholder: str | None = None) -> Enrollment:
        """A token file's bytes (any layout of pidrt.identity.token_files) into the store."""
        clock = time.perf_counter()
        ident, created = import_token_bytes(self.store, data, name, self.base_fingerprint(),
                                            self.pipe.models.preset.text.hidden_size, placeholder)
        return Enrollment(ident, "tokens", created, time.perf_counter() - clock)

    def condition(self, identity_id: str) -> Condition | TokenIdentity:
        if identity_id.startswith("tokens-"):  # a few KiB on the host: the device cache is not for it
            return stored_tokens(self.store, identity_id)
        if self.device_cache is None:
            tensors, meta = self.store.get(identity_id)
        else:
            def load():
                host, self._meta[identity_id] = self.store.get(identity_id)
                return {k: v.to(self.pipe.dtype) if v.is_floating_point() else v for k, v in host.items()}

            tensors = self.device_cache.get(identity_id, load)
            meta = self._meta.get(identity_id) or self.store.get(identity_id)[1]
        method = identity_id.split("-", 1)[0]
        if method == "eaa":
            return eaa_from_tensors(tensors, meta, self.pipe.layers, self.encoders.eaa)
        return folded_from_tensors(method, tensors, meta, self.pipe.layers)

    def forget(self, identity_id: str) -> None:
        """Drop what is cached of an identity (after it was deleted from the store)."""
        self._meta.pop(identity_id, None)
        if self.device_cache is not None:
            self.device_cache.evict(identity_id)

    def _faces(self, images: Sequence[bytes], opts: EnrollOptions, crop: str) -> list[np.ndarray]:
        kind = {"ffhq256": "pidiff", "face512": "inv_adapter", "arcface112": "arcface"}[crop]
        out = []
        ran = _DETECTORS.get()
        for n, data in enumerate(images):
            name = opts.name(n)
            img = faces.load_image(data, name=name)
            face = faces.select_face(faces.detect_faces(img, backend=opts.detector), opts.face_policy, name)
            if ran is not None:
                ran.append(face.detector)
            out.append(faces.preprocess(img, kind, face=face)[crop])
        return out

    def _build(self, images: Sequence[bytes], opts: EnrollOptions):
        clock = time.perf_counter()
        # The detectors that ran, for the entry's metadata: collected per call (enrollments may
        # run in several threads), so in a context variable rather than on the enroller.
        token = _DETECTORS.set([])
        try:
            if opts.method == "eaa":
                tensors, meta = self._build_eaa(images, opts)
            else:
                tensors, meta = self._build_few_token(images, opts)
            ran = _DETECTORS.get()
        finally:
            _DETECTORS.reset(token)
        meta = meta | {"enroll_seconds": f"{time.perf_counter() - clock:.3f}", "references": str(len(images)),
                       "face_detector": ",".join(dict.fromkeys(ran))}
        return tensors, meta

    def _build_few_token(self, images: Sequence[bytes], opts: EnrollOptions):
        e = self.encoders
        adapter = self._adapter(opts.method)
        with torch.no_grad():
            if opts.method == "sca":
                if e.e4e is None:
                    raise PidrtError("SCA enrollment needs an e4e encoder (--e4e)")
                crops = self._faces(images, opts, "ffhq256")
                with _progress(len(crops), "e4e") as bar:
                    codes = []
                    for crop in crops:
                        codes.append(e.e4e.encode(image_to_tensor(crop)))
                        bar.update(1)
                codes = torch.cat(codes)
                w = aggregate(codes, opts.reference_weights)[None]
                tokens = {"cond": adapter.mapping(w)[0], "uncond": adapter.mapping.unconditional()[0]}
                make = SCAIdentity
            else:
                embeds = torch.stack(self.ip_embeddings(images, opts))
                weights = torch.tensor(opts.reference_weights or [1.0] * len(embeds), dtype=embeds.dtype)
                embed = (weights[:, None] * embeds).sum(0, keepdim=True) / weights.sum()
                tokens = {"cond": adapter.image_proj(embed)[0], "uncond": adapter.image_proj(torch.zeros_like(embed))[0]}
                make = IPIdentity
            unet, layers = self.pipe.models.unet, self.pipe.layers
            halves = {h: few_token_payloads(unet, layers, [make(adapter, tokens[h])]) for h in ("cond", "uncond")}
        query = next(iter(halves["cond"].values())).query
        cond = FoldedCondition(opts.method, query, *({n: p.branch for n, p in halves[h].items()} for h in ("cond", "uncond")))
        return folded_to_tensors(cond, layers, tokens)

    def ip_embeddings(self, images: Sequence[bytes], opts: EnrollOptions) -> list[torch.Tensor]:
        """The embedding of each image that IP-Adapter's projection reads (CLIP, or ArcFace for FaceID)."""
        adapter = self._adapter("ip")
        if isinstance(adapter.image_proj, MLPProjModel):  # FaceID: ArcFace identity embedding
            crops = self._faces(images, opts, "arcface112")
            return [torch.from_numpy(faces.arcface_embedding(c, self.encoders.arcface_pack)) for c in crops]
        if self.encoders.image_encoder is None:
            raise PidrtError("IP-Adapter enrollment needs a CLIP image encoder (--image-encoder)")
        return [self.encoders.image_encoder.embed(c) for c in self._faces(images, opts, "face512")]

    def _build_eaa(self, images: Sequence[bytes], opts: EnrollOptions):
        from PIL import Image

        adapter = self._adapter("eaa")
        side = self._resolution(opts)
        latent = side // self.pipe.models.preset.latent_scale
        if adapter.latent_size != latent:
            raise PidrtError(f"the EAA adapter aggregates tokens for {adapter.latent_size}x{adapter.latent_size} "
                             f"latents; resolution {side} gives {latent}x{latent}")
        crops = self._faces(images, opts, "face512")
        calls = opts.steps * (2 if opts.record_from == "reconstruction" else 1) * len(crops)
        per_reference, latents_t = [], []
        with _progress(calls, "EAA inversion") as bar:
            for crop in crops:
                pixels = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS), np.float32)
                x = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None]
                inv = invert_and_record(self.pipe, self.pipe.encode_image(x), opts.caption, opts.steps,
                                        opts.record_from, on_call=lambda: bar.update(1))
                per_reference.append(eaa_features(adapter, self.pipe, inv))
                latents_t.append(inv.latent_t)
        steps = per_reference[0] if len(per_reference) == 1 else concat_references(per_reference)
        return eaa_to_tensors(steps, self.pipe.layers, torch.cat(latents_t), opts.caption)

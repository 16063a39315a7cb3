"""Build a pipeline and the enrollment encoders from user options (the CLI's and the service's edge).

With no `model` path the preset's seeded random weights are used, and any adapter or encoder
not given is random too. With real weights nothing is made up: a method whose adapter file was
not given is unavailable, and enrolling with it says which file is missing.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pidrt.errors import PidrtError
from pidrt.identity.enroll import Encoders
from pidrt.models.adapter_files import load_adapter
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter
from pidrt.models.build import build_random
from pidrt.models.presets import PRESETS, get_preset
from pidrt.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeOptions:
    preset: str = "tiny"
    model: Path | None = None  # diffusers folder or single-file .safetensors
    sca_adapter: Path | None = None
    ip_adapter: Path | None = None
    eaa_adapter: Path | None = None
    e4e: Path | None = None  # e4e_ffhq_encode.pt
    image_encoder: Path | None = None  # CLIP vision folder for IP-Adapter
    arcface_pack: str | None = None  # insightface pack for IP-Adapter FaceID
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PidrtError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")


def build_runtime(opts: RuntimeOptions) -> tuple[Pipeline, Encoders]:
    preset = get_preset(opts.preset)
    if opts.model is not None:
        from pidrt.models.loading import load_models

        models = load_models(Path(opts.model), preset)
    else:
        models = build_random(preset, seed=opts.seed)
    pipe = Pipeline(models, device=opts.device, dtype=DTYPES[opts.dtype])
    return pipe, build_encoders(pipe, opts)


def build_encoders(pipe: Pipeline, opts: RuntimeOptions) -> Encoders:
    from pidrt.identity.e4e import E4EEncoder
    from pidrt.identity.image_encoder import ClipImageEncoder

    preset = pipe.models.preset
    layers, dim = pipe.layers, preset.unet.cross_attention_dim
    n_levels = len(preset.unet.block_out_channels)
    # Random adapters only beside random base weights: with real weights a missing file must be an error.
    random_ok = opts.model is None

    def adapter(path, kind, make_random):
        if path is not None:
            loaded = load_adapter(Path(path), layers, dim, n_levels)
            if not isinstance(loaded, kind):
                raise PidrtError(f"{path}: is a {type(loaded).__name__}, not a {kind.__name__}")
            return loaded
        return make_random() if random_ok else None

    latent = preset.resolution // preset.latent_scale
    return Encoders(
        sca=adapter(opts.sca_adapter, SCAAdapter, lambda: SCAAdapter.random(layers, dim, seed=opts.seed)),
        ip=adapter(opts.ip_adapter, IPAdapterWeights,
                   lambda: IPAdapterWeights.random(layers, dim, seed=opts.seed, embeddings_dim=64)),
        eaa=adapter(opts.eaa_adapter, EAAAdapter,
                    lambda: EAAAdapter.random(layers, latent, n_levels, s_c=16, seed=opts.seed)),
        e4e=E4EEncoder.from_checkpoint(opts.e4e) if opts.e4e else (E4EEncoder.random(opts.seed) if random_ok else None),
        image_encoder=ClipImageEncoder.load(opts.image_encoder) if opts.image_encoder
        else (ClipImageEncoder.random(64, opts.seed) if random_ok else None),
        arcface_pack=opts.arcface_pack,
    )


def add_runtime_arguments(p, seed_option: str = "--seed") -> None:
    """The options every command that builds a pipeline takes (CLI, serve, bench). `pidrt generate`
    names the weights' seed --weights-seed: its --seed is the images'."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model shapes (tiny: seconds on a CPU; *-inpainting: a 9-channel inpainting UNet)")
    p.add_argument("--model", type=Path, help="diffusers SD1.5 folder or single-file .safetensors (default: random weights)")
    p.add_argument("--sca-adapter", type=Path, help="pidrt SCA .safetensors or the W+ adapter's wplus_adapter.bin")
    p.add_argument("--ip-adapter", type=Path, help="ip-adapter*.safetensors / .bin")
    p.add_argument("--eaa-adapter", type=Path, help="pidrt EAA .safetensors")
    p.add_argument("--e4e", type=Path, help="e4e_ffhq_encode.pt (SCA's W+ encoder)")
    p.add_argument("--image-encoder", type=Path, help="CLIP vision folder (IP-Adapter)")
    p.add_argument("--arcface-pack", help="insightface model pack path or name (IP-Adapter FaceID)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument(seed_option, dest="weights_seed", type=int, default=0, help="seed of random weights (when no --model)")


def runtime_options_from_args(a: argparse.Namespace) -> "RuntimeOptions":
    return RuntimeOptions(
        preset=a.preset, model=a.model, sca_adapter=a.sca_adapter, ip_adapter=a.ip_adapter, eaa_adapter=a.eaa_adapter,
        e4e=a.e4e, image_encoder=a.image_encoder, arcface_pack=a.arcface_pack, device=a.device, dtype=a.dtype,
        seed=a.weights_seed,
    )

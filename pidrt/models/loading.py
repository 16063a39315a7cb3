"""Load real SD1.5 weights from the user's disk, offline, and check them against a preset.

Two layouts are accepted (see docs/loading.md):

* a diffusers folder (`unet/`, `text_encoder/`, `vae/`, `tokenizer/`), read with the libraries'
  own `from_pretrained(local_files_only=True)` after its configs are compared with the preset;
* one `.safetensors` file in the original LDM/CompVis key layout, converted with diffusers'
  single-file converters, using the preset (never a hub config) as the architecture.

An inpainting UNet (9 input channels) in either layout is recognised by its conv_in (folder:
`in_channels` in unet/config.json; single file: `model.diffusion_model.input_blocks.0.0.weight`
is [320, 9, 3, 3]) and loaded as the preset's inpainting twin (`sd15` -> `sd15-inpainting`).

Every problem a user can cause is a `FormatError` naming the file and what was expected, because a
silently half-loaded model (random-initialised missing weights) produces plausible-looking noise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import math
from pathlib import Path

import torch

from pidrt.errors import FormatError, PidrtError
from pidrt.models.build import Models, build_text_encoder
from pidrt.models.presets import SD15, Preset, TextConfig, for_unet_channels
from pidrt.models.tokenizer import ClipTokenizer, HashTokenizer, Tokenizer

log = logging.getLogger(__name__)

# Pickle-based formats execute code on load; we never open them.
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
SUBFOLDERS = ("unet", "text_encoder", "vae", "tokenizer")
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
# Config fields that do not change the weights' layout or the math of a forward pass.
IGNORED_DIFFUSERS_FIELDS = {"sample_size", "dropout", "force_upcast"}
# Token ids and projection_dim are not used by CLIPTextModel's forward (SD1.5's own config says
# bos=0/eos=2 while the real ids are 49406/49407), so only these define the text encoder.
TEXT_ARCH_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps",
)
LDM_UNET, LDM_VAE, LDM_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
LDM_CONV_IN = LDM_UNET + "input_blocks.0.0.weight"  # [C, in_channels, 3, 3]
MAX_LISTED = 10


def load_models(
    path: Path | str, preset: Preset = SD15, dtype: torch.dtype = torch.float32, tokenizer: Path | str | None = None
) -> Models:
    """Load a diffusers folder or an LDM single-file `.safetensors` at `path`, checked against `preset`.

    `tokenizer` is a CLIP tokenizer folder (vocab.json + merges.txt); it overrides the folder's own
    and is how a single file, which carries no tokenizer, gets real CLIP BPE.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FormatError(
            f"{path}: no such file or folder; expected a diffusers folder ({', '.join(s + '/' for s in SUBFOLDERS)}) "
            "or a single-file .safetensors checkpoint"
        )
    path = path.resolve()
    tok = ClipTokenizer(Path(tokenizer).expanduser(), preset.text.max_position_embeddings) if tokenizer else None
    models = _load_folder(path, preset, tok, dtype) if path.is_dir() else _load_single_file(path, preset, tok)
    for module in (models.unet, models.text_encoder, models.vae):
        module.eval().requires_grad_(False)
        # Cast only when needed: diffusers warns on every `.to(dtype)` of a from_pretrained model.
        if any(p.dtype != dtype for p in module.parameters()):
            module.to(dtype=dtype)
    return models


# ----------------------------------------------------------------------------- diffusers folder


def _load_folder(root: Path, preset: Preset, tok: Tokenizer | None, dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub in SUBFOLDERS:
        if not (root / sub).is_dir() and not (sub == "tokenizer" and tok is not None):
            raise FormatError(
                f"{root}: missing subfolder {sub}/; a diffusers SD1.5 folder has {', '.join(s + '/' for s in SUBFOLDERS)}"
            )
    in_channels = _read_config(root / "unet").get("in_channels", 4)
    if isinstance(in_channels, int):
        preset = for_unet_channels(preset, in_channels)
    # Configs are checked before any weights are read: a mismatch is reported by field, not as a
    # wall of shape errors, and loading a wrong model would waste time and memory.
    _check_diffusers_config(root / "unet", UNet2DConditionModel, preset.unet.diffusers_kwargs(), preset.name)
    _check_text_config(root / "text_encoder", preset.text, preset.name)
    _check_diffusers_config(root / "vae", AutoencoderKL, preset.vae.diffusers_kwargs(), preset.name)
    # diffusers takes the dtype at load time (see load_models); transformers' keyword for it
    # changed between versions, so the text encoder is cast afterwards instead.
    diffusers_kw = {"torch_dtype": dtype, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    unet = _from_pretrained(UNet2DConditionModel, root / "unet", **diffusers_kw)
    text_encoder = _from_pretrained(CLIPTextModel, root / "text_encoder")
    vae = _from_pretrained(AutoencoderKL, root / "vae", **diffusers_kw)
    if tok is None:
        tok = ClipTokenizer(root / "tokenizer", preset.text.max_position_embeddings)
    return Models(preset, unet, text_encoder, vae, tok, name=f"folder:{root}:{_folder_stamp(root)}")


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FormatError(f"{file}: missing; every model subfolder needs its config.json")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{file}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{file}: expected a JSON object, found {type(config).__name__}")
    return config


def _same(a, b) -> bool:
    a, b = (tuple(v) if isinstance(v, list) else v for v in (a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def _raise_if_differs(file: Path, expected: dict, actual: dict, fields, preset_name: str) -> None:
    diffs = [f"{k}: file has {actual.get(k)!r}, preset has {expected.get(k)!r}"
             for k in fields if not _same(expected.get(k), actual.get(k))]
    if diffs:
        raise FormatError(
            f"{file}: architecture differs from preset '{preset_name}' in {len(diffs)} field(s): " + "; ".join(diffs)
        )


def _check_diffusers_config(folder: Path, cls, preset_kwargs: dict, preset_name: str) -> None:
    config = _read_config(folder)
    name = config.get("_class_name")
    if name not in (None, cls.__name__):
        raise FormatError(f"{folder / 'config.json'}: _class_name is {name!r}, expected {cls.__name__!r}")
    # Fields absent from a config take the class defaults, exactly as from_pretrained would, so
    # comparing over the whole constructor signature catches e.g. use_linear_projection (SD2).
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    expected = {**defaults, **preset_kwargs}
    actual = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    fields = [k for k in defaults if k not in IGNORED_DIFFUSERS_FIELDS]
    _raise_if_differs(folder / "config.json", expected, actual, fields, preset_name)
    _weights_file(folder, WEIGHT_NAMES[folder.name])


def _check_text_config(folder: Path, text: TextConfig, preset_name: str) -> None:
    from transformers import CLIPTextConfig

    _read_config(folder)  # clear error for a missing/broken file before transformers sees it
    try:
        actual = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True).to_dict()
    except Exception as exc:  # transformers raises several types for a bad config
        raise FormatError(f"{folder / 'config.json'}: not a CLIP text config ({exc})") from exc
    _raise_if_differs(folder / "config.json", vars(text), actual, TEXT_ARCH_FIELDS, preset_name)
    _weights_file(folder, WEIGHT_NAMES["text_encoder"])


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    # Sharded checkpoints come with an index file; libraries resolve the shards themselves.
    for name in names:
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    raise FormatError(f"{folder}: missing weights file; expected one of {', '.join(names)}")


def _from_pretrained(cls, folder: Path, **kwargs):
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as exc:  # corrupt files surface as OSError, ValueError, SafetensorError...
        raise FormatError(f"{folder}: could not load {cls.__name__} weights ({exc})") from exc
    # The libraries only warn about missing keys and initialise them randomly; that is an error here.
    found = {
        "missing": sorted(map(str, info.get("missing_keys") or ())),
        "unexpected": sorted(str(k) for k in info.get("unexpected_keys") or () if not str(k).endswith("position_ids")),
        "wrong shape": sorted(map(str, info.get("mismatched_keys") or ())),
    }
    problems = [_listing(f"{cls.__name__} {kind}", keys) for kind, keys in found.items() if keys]
    if problems:
        raise FormatError(f"{_weights_file(folder, WEIGHT_NAMES[folder.name])}: weights do not match config.json: "
                          + "; ".join(problems))
    return model


def _folder_stamp(root: Path) -> str:
    h = hashlib.sha256()
    # Sizes and mtimes, not contents: hashing ~4 GB on every start would be slow, and the identity
    # store fingerprints the weights it actually uses separately.
    files = (p for sub in SUBFOLDERS if (root / sub).is_dir() for p in (root / sub).iterdir() if p.is_file())
    for file in sorted(files):
        st = file.stat()
        h.update(f"{file.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- LDM single file


def _load_single_file(path: Path, preset: Preset, tok: Tokenizer | None) -> Models:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(
            f"{path}: '{path.suffix}' checkpoints are Python pickles, which can run code when opened; pidrt only "
            "reads .safetensors. Convert it once, in an environment you trust, to .safetensors (see docs/loading.md)"
        )
    state = _read_safetensors(path)
    if not any(k.startswith(LDM_UNET) for k in state):
        prefixes = sorted({k.split(".")[0] for k in state})[:MAX_LISTED]
        raise FormatError(
            f"{path}: not an LDM/CompVis SD checkpoint: no '{LDM_UNET}*' keys (top-level prefixes: {prefixes}); "
            "a diffusers model must be given as its folder"
        )
    conv_in = state.get(LDM_CONV_IN)
    if conv_in is not None and conv_in.ndim == 4:
        preset = for_unet_channels(preset, conv_in.shape[1])
    unet, text_encoder, vae = _convert(path, state, preset)
    if tok is None and (path.parent / "tokenizer").is_dir():
        tok = ClipTokenizer(path.parent / "tokenizer", preset.text.max_position_embeddings)
    if tok is None:
        log.warning("%s: no tokenizer given and no sibling tokenizer/ folder; using HashTokenizer, so prompts "
                    "will not be meaningful to the real text encoder (pass tokenizer=<CLIP tokenizer folder>)", path)
        tok = HashTokenizer(preset.text)
    st = path.stat()
    return Models(preset, unet, text_encoder, vae, tok, name=f"file:{path}:{st.st_size}:{st.st_mtime_ns}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, and whatever a malformed header triggers
        with path.open("rb") as fh:
            head = fh.read(2)
        looks_pickled = head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        hint = " (its bytes look like a zip/pickle: a renamed .ckpt?)" if looks_pickled else ""
        raise FormatError(f"{path}: not a valid safetensors file ({exc}){hint}") from exc


def _ignorable(key: str) -> bool:
    # Real SD1.5 files also hold the DDPM schedule buffers (no dot: `betas`, `alphas_cumprod`...),
    # EMA copies, the VAE's training loss (LPIPS/discriminator) and CLIP's position_ids buffer.
    return ("." not in key or key.startswith(("model_ema.", LDM_VAE + "loss."))
            or key.endswith("position_ids"))


def _convert(path: Path, state: dict, preset: Preset):
    try:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        )
    except ImportError as exc:
        raise PidrtError(f"this diffusers version lacks the LDM single-file converters ({exc})") from exc

    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _uninitialised(UNet2DConditionModel, preset.unet.diffusers_kwargs())
    vae = _uninitialised(AutoencoderKL, preset.vae.diffusers_kwargs())
    with torch.random.fork_rng(devices=[]):  # building draws random init; keep the caller's RNG intact
        text_encoder = build_text_encoder(preset)  # small, and its position_ids buffer must be real
    # The converters rename keys but hand back the file's own tensors (or views of them), so a
    # tensor's data pointer tells which file key it came from: that is how unused keys are found.
    source = {t.data_ptr(): k for k, t in state.items() if t.numel()}
    te_prefixed = any(k.startswith("text_model.") for k in text_encoder.state_dict())

    def clip(sd):  # files have `text_model.` or not (old layout); match the installed CLIPTextModel
        stripped = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
        return {("text_model." + k if te_prefixed else k): v for k, v in stripped.items()}

    parts = (
        ("unet", unet, LDM_UNET, lambda sd: convert_ldm_unet_checkpoint(sd, preset.unet.diffusers_kwargs())),
        ("text_encoder", text_encoder, LDM_CLIP, clip),
        ("vae", vae, LDM_VAE, lambda sd: convert_ldm_vae_checkpoint(sd, preset.vae.diffusers_kwargs())),
    )
    used: set[str] = set()
    problems: list[str] = []
    for label, module, prefix, fn in parts:
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        try:
            converted = fn(own)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as exc:
            # The converters index some keys directly (e.g. an upsampler's bias next to its weight).
            key = f"{prefix}{exc.args[0]}" if isinstance(exc, KeyError) and exc.args else exc
            raise FormatError(f"{path}: {label}: cannot convert the LDM layout, missing or malformed key: {key}") from exc
        problems += _place(label, module, converted, source, used)
    unexpected = [k for k in state if k not in used and not _ignorable(k)]
    if unexpected:
        problems.insert(0, _listing("unexpected", unexpected))
    if problems:
        raise FormatError(f"{path}: checkpoint does not match preset '{preset.name}': " + "; ".join(problems))
    return unet, text_encoder, vae


def _uninitialised(cls, kwargs: dict) -> torch.nn.Module:
    """`cls(**kwargs)` on CPU without random init (~10 s for SD1.5's UNet), which the strict load overwrites."""
    with torch.device("meta"):
        module = cls(**kwargs)
    # Non-persistent buffers are not in the state dict, so they would stay uninitialised memory.
    if {name for name, _ in module.named_buffers()} - set(module.state_dict()):
        with torch.random.fork_rng(devices=[]):
            return cls(**kwargs)
    return module.to_empty(device="cpu")


def _place(label: str, module: torch.nn.Module, converted: dict, source: dict, used: set) -> list[str]:
    """Copy converted tensors into `module`; return problems (missing/unexpected/shape) as text."""
    expected = module.state_dict()
    ok, stray, shapes = {}, [], []
    for key, tensor in converted.items():
        if tensor is None:  # the converter looked up a key the file lacks; reported as missing below
            continue
        src = source.get(tensor.data_ptr(), key)
        used.add(src)  # reported here if it does not fit, so not again as an unused file key
        if key not in expected:
            if not _ignorable(src):
                stray.append(f"{src} (-> {key})")  # a file key that maps to nothing in this architecture
        elif tensor.shape != expected[key].shape:
            shapes.append(f"{src} (-> {key}) is {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        else:
            ok[key] = tensor
    missing = [k for k in expected if converted.get(k) is None]
    problems = [_listing(f"{label} {kind}", keys)
                for kind, keys in (("missing", missing), ("unexpected", stray), ("wrong shape", shapes)) if keys]
    if not problems:
        module.load_state_dict(ok, strict=True)  # copies, casting the file's dtype (often fp16) to the module's
    return problems


def _listing(kind: str, keys: list[str]) -> str:
    more = f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"{len(keys)} {kind} key(s): {', '.join(keys[:MAX_LISTED])}{more}"

"""What each exported graph takes and returns: names, dtypes, dynamic axes, engine profiles.

One `ModelSpec` per graph is the single source of truth shared by the exporter (input names,
dynamic axes, trace inputs), the runners (feed checks, output allocation) and the TensorRT
builder (min/opt/max shapes). It is plain data and round-trips through `manifest.json`, so a
runner never needs the torch model to know a graph's contract.

A dimension is an int or a string: a named dynamic axis ("batch", "height", "width" = latent
sides, "tokens_<l>" = tokens of a latent halved l times) or an axis times / divided by an int
("height*8"). `Profile` gives min/opt/max values of batch, height and width; every other axis
follows from them, so an engine profile is consistent across all inputs by construction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pidrt.errors import PidrtError
from pidrt.models.adapters import layer_level
from pidrt.models.attention import LayerInfo
from pidrt.models.presets import Preset

METHODS = ("none", "sca", "ip", "eaa")
KINDS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DTYPES = ("float32", "float16")
OPSET = 18
Dim = int | str
_EXPR = re.compile(r"^([a-z_][a-z0-9_]*)(?:([*/])(\d+))?$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int32
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class Profile:
    """min/opt/max of the batch and the latent sides: one TensorRT optimisation profile."""

    batch: tuple[int, int, int] = (1, 2, 4)
    height: tuple[int, int, int] = (8, 8, 16)
    width: tuple[int, int, int] = (8, 8, 16)

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise PidrtError(f"profile {name} needs 1 <= min <= opt <= max; got {(lo, opt, hi)}")

    def contains(self, batch: int, height: int, width: int) -> bool:
        return all(r[0] <= v <= r[2] for r, v in ((self.batch, batch), (self.height, height), (self.width, width)))


def default_profiles(preset: Preset) -> tuple[Profile, ...]:
    """Batch counts CFG's two halves. tiny: 64-128 px; sd15: 256-768 px, 512 px optimal."""
    if preset.family == "tiny":
        return (Profile((1, 2, 4), (8, 8, 16), (8, 8, 16)),)
    side = preset.resolution // preset.latent_scale
    return (Profile((1, 2, 8), (side // 2, side, side * 3 // 2), (side // 2, side, side * 3 // 2)),)


def axis_env(batch: int, height: int, width: int, levels: int) -> dict[str, int]:
    """Values of every named axis for one point; stride-2 downsampling rounds up."""
    env = {"batch": batch, "height": height, "width": width}
    for level in range(levels):
        f = 2 ** level
        env[f"tokens_{level}"] = -(-height // f) * -(-width // f)
    return env


def resolve(dim: Dim, env: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    name, op, k = _EXPR.match(dim).groups()
    value = env[name]
    return value if op is None else value * int(k) if op == "*" else value // int(k)


def bind(dims: Sequence[Dim], shape: Sequence[int], env: dict[str, int], where: str) -> None:
    """Check `shape` against `dims`, recording named axes in `env` (and checking repeats)."""
    if len(dims) != len(shape):
        raise PidrtError(f"{where}: expected rank {len(dims)} {tuple(dims)}, got shape {tuple(shape)}")
    for dim, size in zip(dims, shape):
        if isinstance(dim, int):
            if size != dim:
                raise PidrtError(f"{where}: expected shape {tuple(dims)}, got {tuple(shape)}")
            continue
        name, op, k = _EXPR.match(dim).groups()
        if op == "*" and size % int(k):
            raise PidrtError(f"{where}: axis {dim!r} must be a multiple of {k}, got {size}")
        value = size if op is None else size // int(k) if op == "*" else size * int(k)
        if env.setdefault(name, value) != value:
            raise PidrtError(f"{where}: axis {name!r} is {env[name]} elsewhere but {value} here ({tuple(shape)})")


@dataclass(frozen=True)
class ModelSpec:
    """One graph: `name` is also its file stem (unet_sca_fp16.onnx)."""

    name: str
    kind: str
    method: str  # "none" except for UNets with an identity branch
    dtype: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    levels: int  # how many latent sizes the UNet runs at (tokens_<l> axes)
    # (processor index, layer name) of each layer that takes identity inputs, in input order.
    identity_layers: tuple[tuple[int, str], ...] = ()
    n_tokens: int = 0  # few-token branch tokens per head (SCA/IP)
    opset: int = OPSET
    plugins: bool = False  # identity branches as TensorRT plugin nodes (export/plugin_nodes.py)
    # Layout-and-Retouch (export/retouch_io.py): (processor index, name) of the self-attention
    # layers whose K/V swap and blend are inputs, and of the cross layers whose maps are outputs.
    retouch_layers: tuple[tuple[int, str], ...] = ()
    map_layers: tuple[tuple[int, str], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in self.inputs + self.outputs if any(isinstance(d, str) for d in t.dims)}

    def shapes_at(self, batch: int, height: int, width: int, tensors=None) -> dict[str, tuple[int, ...]]:
        env = axis_env(batch, height, width, self.levels)
        return {t.name: tuple(resolve(d, env) for d in t.dims) for t in (tensors or self.inputs)}

    def profile_shapes(self, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """input name -> (min, opt, max) shape, the form TensorRT's profiles take."""
        points = [self.shapes_at(profile.batch[i], profile.height[i], profile.width[i]) for i in range(3)]
        return {name: tuple(p[name] for p in points) for name in self.input_names}

    def bind_inputs(self, shapes: dict[str, Sequence[int]]) -> dict[str, int]:
        """Check a feed's shapes against the spec; returns the axis values (for output shapes)."""
        missing = [n for n in self.input_names if n not in shapes]
        unexpected = sorted(set(shapes) - set(self.input_names))
        if missing or unexpected:
            raise PidrtError(f"{self.name}: inputs do not match the graph: missing {missing[:6]}"
                             f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}")
        env: dict[str, int] = {}
        for t in self.inputs:
            bind(t.dims, shapes[t.name], env, f"{self.name} input {t.name!r}")
        return env

    def output_shapes(self, env: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(resolve(d, env) for d in t.dims) for t in self.outputs}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelSpec:
        tensors = lambda items: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in items)
        return cls(
            name=d["name"], kind=d["kind"], method=d["method"], dtype=d["dtype"],
            inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]),
            profiles=tuple(Profile(*(tuple(p[k]) for k in ("batch", "height", "width"))) for p in d["profiles"]),
            levels=d["levels"], identity_layers=tuple((int(i), str(n)) for i, n in d["identity_layers"]),
            n_tokens=d["n_tokens"], opset=d["opset"], plugins=bool(d.get("plugins", False)),
            retouch_layers=tuple((int(i), str(n)) for i, n in d.get("retouch_layers", ())),
            map_layers=tuple((int(i), str(n)) for i, n in d.get("map_layers", ())),
        )


def graph_name(kind: str, method: str, dtype: str, plugins: bool = False, retouch: bool = False) -> str:
    parts = [kind] + ([method] if kind == "unet" else []) + (["retouch"] if retouch else [])
    parts.append("fp16" if dtype == "float16" else "fp32")
    return "_".join(parts + (["plugins"] if plugins else []))


def _check(method: str, dtype: str) -> None:
    if method not in METHODS:
        raise PidrtError(f"unknown identity method {method!r}; choose one of {METHODS}")
    if dtype not in DTYPES:
        raise PidrtError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")


def unet_spec(preset: Preset, layers: Sequence[LayerInfo], method: str = "none", dtype: str = "float32",
              n_tokens: int = 4, eaa_cross_tokens: int | None = None, profiles: tuple[Profile, ...] | None = None,
              plugins: bool = False, retouch_blocks: tuple[int, int] | None = None, map_level: int = 2) -> ModelSpec:
    """The UNet graph of one identity method (the input contract is in docs/engines.md).

    plugins: the branches as TensorRT plugin nodes; same inputs and outputs (a base UNet has none).
    retouch_blocks: (start, end) transformer blocks whose self-attention swap and blend are
    inputs, plus the subject maps at `map_level` as a second output (export/retouch_io.py).
    """
    _check(method, dtype)
    plugins = plugins and method != "none"
    u = preset.unet
    levels = len(u.block_out_channels)
    eaa_cross_tokens = eaa_cross_tokens or (16 if preset.family == "tiny" else 256)
    inputs = [
        TensorSpec("sample", dtype, ("batch", u.in_channels, "height", "width")),
        # float32 whatever the graph dtype: timesteps up to 999 must stay exact.
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", dtype, ("batch", preset.text.max_position_embeddings, u.cross_attention_dim)),
        # What cross-attention's to_v reads (token identities); the same tensor as
        # encoder_hidden_states for ordinary prompts, so one graph serves both.
        TensorSpec("value_context", dtype, ("batch", preset.text.max_position_embeddings, u.cross_attention_dim)),
    ]
    chosen: list[LayerInfo] = []
    if method in ("sca", "ip"):
        chosen = [layer for layer in layers if layer.kind == "cross"]
        inputs.append(TensorSpec("scale", dtype, ("batch",)))
        for layer in chosen:
            hn = layer.heads * n_tokens
            inputs += [TensorSpec(f"a_{layer.index}", dtype, ("batch", layer.channels, hn)),
                       TensorSpec(f"b_{layer.index}", dtype, ("batch", hn, layer.channels)),
                       TensorSpec(f"bias_{layer.index}", dtype, ("batch", layer.channels))]
    elif method == "eaa":
        chosen = list(layers)
        inputs.append(TensorSpec("scale", dtype, ("batch",)))
        for layer in chosen:
            m: Dim = f"tokens_{layer_level(layer.name, levels)}" if layer.kind == "self" else eaa_cross_tokens
            inputs += [TensorSpec(f"k_{layer.index}", dtype, ("batch", m, layer.channels)),
                       TensorSpec(f"v_{layer.index}", dtype, ("batch", m, layer.channels))]
    outputs = [TensorSpec("noise_pred", dtype, ("batch", u.out_channels, "height", "width"))]
    edited, mapped = [], []
    if retouch_blocks is not None:
        from pidrt.export import retouch_io

        edited = retouch_io.retouch_layers(layers, retouch_blocks)
        mapped = retouch_io.subject_map_layers(layers, map_level, levels)
        more_in, more_out = retouch_io.spec_tensors(edited, mapped, levels, dtype, preset.text.max_position_embeddings)
        inputs += more_in
        outputs += more_out
    return ModelSpec(
        name=graph_name("unet", method, dtype, plugins, bool(edited)), kind="unet", method=method, dtype=dtype,
        inputs=tuple(inputs), outputs=tuple(outputs), profiles=profiles or default_profiles(preset), levels=levels,
        identity_layers=tuple((layer.index, layer.name) for layer in chosen),
        n_tokens=n_tokens if method in ("sca", "ip") else 0, plugins=plugins,
        retouch_layers=tuple((layer.index, layer.name) for layer in edited),
        map_layers=tuple((layer.index, layer.name) for layer in mapped),
    )


def text_encoder_spec(preset: Preset, dtype: str = "float32", profiles: tuple[Profile, ...] | None = None) -> ModelSpec:
    _check("none", dtype)
    t = preset.text
    return ModelSpec(
        name=graph_name("text_encoder", "none", dtype), kind="text_encoder", method="none", dtype=dtype,
        # int32 ids: TensorRT's native index type (the tokenizer's int64 ids are cast on feed).
        inputs=(TensorSpec("input_ids", "int32", ("batch", t.max_position_embeddings)),),
        outputs=(TensorSpec("last_hidden_state", dtype, ("batch", t.max_position_embeddings, t.hidden_size)),),
        profiles=profiles or default_profiles(preset), levels=1,
    )


def vae_decoder_spec(preset: Preset, dtype: str = "float32", profiles: tuple[Profile, ...] | None = None) -> ModelSpec:
    """latent (already the UNet's scale) -> images in [0, 1], as Pipeline.decode returns."""
    _check("none", dtype)
    f, v = preset.latent_scale, preset.vae
    return ModelSpec(
        name=graph_name("vae_decoder", "none", dtype), kind="vae_decoder", method="none", dtype=dtype,
        inputs=(TensorSpec("latent", dtype, ("batch", v.latent_channels, "height", "width")),),
        outputs=(TensorSpec("images", dtype, ("batch", v.out_channels, f"height*{f}", f"width*{f}")),),
        profiles=profiles or default_profiles(preset), levels=1,
    )


def vae_encoder_spec(preset: Preset, dtype: str = "float32", profiles: tuple[Profile, ...] | None = None) -> ModelSpec:
    """images in [0, 1] -> scaled latent mean (deterministic, as inversion wants; Pipeline.encode_image)."""
    _check("none", dtype)
    f, v = preset.latent_scale, preset.vae
    return ModelSpec(
        name=graph_name("vae_encoder", "none", dtype), kind="vae_encoder", method="none", dtype=dtype,
        inputs=(TensorSpec("images", dtype, ("batch", v.in_channels, f"height*{f}", f"width*{f}")),),
        outputs=(TensorSpec("latent", dtype, ("batch", v.latent_channels, "height", "width")),),
        profiles=profiles or default_profiles(preset), levels=1,
    )


@dataclass(frozen=True)
class SpecOptions:
    """Knobs of the specs that are not in the preset."""

    n_tokens: int = 4
    eaa_cross_tokens: int | None = None  # s_c of the EAA adapter; None: 16 for tiny, 256 (the paper's) else
    profiles: tuple[Profile, ...] | None = None
    plugins: bool = False  # UNet identity branches as TensorRT plugin nodes (export/plugin_nodes.py)
    # Layout-and-Retouch inputs for these transformer blocks (MasaCtrl's default: (10, 16)); None: none.
    retouch_blocks: tuple[int, int] | None = None


def model_spec(kind: str, preset: Preset, layers: Sequence[LayerInfo], method: str, dtype: str,
               options: SpecOptions = SpecOptions()) -> ModelSpec:
    if kind == "unet":
        return unet_spec(preset, layers, method, dtype, options.n_tokens, options.eaa_cross_tokens, options.profiles,
                         options.plugins, options.retouch_blocks)
    makers = {"text_encoder": text_encoder_spec, "vae_decoder": vae_decoder_spec, "vae_encoder": vae_encoder_spec}
    if kind not in makers:
        raise PidrtError(f"unknown graph kind {kind!r}; choose from {KINDS}")
    return makers[kind](preset, dtype, options.profiles)

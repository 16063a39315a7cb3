"""Named graph inputs from what the torch pipeline holds, and random inputs for tracing and checks.

`unet_feed` is the one place that turns a `BranchState`'s payloads into a UNet graph's identity
inputs (docs/engines.md has the contract). It refuses what a graph cannot express instead of
silently dropping it: a nonzero score bias, unfolded branches, another method's payloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.export import retouch_io
from pidrt.export.specs import ModelSpec, axis_env, resolve
from pidrt.export.wrappers import QUERY
from pidrt.models.attention import EAAKV, EAARows, FoldedLayer, Payload, attention_layers

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}


def _zeros(spec: ModelSpec, name: str, env: dict[str, int], device) -> torch.Tensor:
    t = spec.input(name)
    return torch.zeros(tuple(resolve(d, env) for d in t.dims), dtype=TORCH_DTYPES[t.dtype], device=device)


def _check_payload(spec: ModelSpec, name: str, p: Payload) -> None:
    if spec.method in QUERY:
        if not isinstance(p, FoldedLayer):
            raise PidrtError(f"{name}: a {spec.method} graph takes folded few-token payloads, got "
                             f"{type(p).__name__} (run the pipeline with SamplingConfig(folded=True))")
        if p.query != QUERY[spec.method]:
            raise PidrtError(f"{name}: payload queries {p.query!r} but the {spec.method} graph queries "
                             f"{QUERY[spec.method]!r}; export the graph of the identity's method")
        if p.branch.n_tokens != spec.n_tokens:
            raise PidrtError(f"{name}: the identity has {p.branch.n_tokens} tokens, the graph was exported "
                             f"for {spec.n_tokens}; re-export with SpecOptions(n_tokens={p.branch.n_tokens})")
        if torch.count_nonzero(p.branch.score_bias):
            raise PidrtError(f"{name}: nonzero score bias (a post_out SCA adapter: its query reads to_out(Z), "
                             "whose bias folds into the scores); exported graphs take no score bias, so run "
                             "post_out identities on the torch backend (docs/engines.md)")
    elif isinstance(p, EAARows):
        raise PidrtError(f"{name}: EAA recomputed from reference rows in the batch cannot feed an engine (its K/V "
                         "come from inside the UNet call); use cached K/V (resident or streamed placement)")
    elif not isinstance(p, EAAKV):
        raise PidrtError(f"{name}: the {spec.method} graph takes EAA K/V payloads, got {type(p).__name__}")


def unet_feed(spec: ModelSpec, sample: torch.Tensor, timestep, ctx: torch.Tensor,
              scale: torch.Tensor | None = None, payloads: Mapping[str, Payload] | None = None,
              value_context: torch.Tensor | None = None, swap: Mapping | None = None,
              maps=None) -> dict[str, torch.Tensor]:
    """All named inputs of a UNet graph; layers without a payload get zeros (exactly no branch).

    ctx is the K context of cross-attention, value_context its V context (None: ctx, as for
    ordinary prompts). swap, maps: a `BranchState`'s retouch edits and subject-map recorder
    (export/retouch_io.py).
    """
    batch, device = sample.shape[0], sample.device
    dtype = TORCH_DTYPES[spec.dtype]
    payloads = dict(payloads or {})
    feed = {
        "sample": sample.to(dtype),
        "timestep": torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1).expand(batch).contiguous(),
        "encoder_hidden_states": ctx.to(device, dtype),
    }
    if "value_context" in spec.input_names:
        v = feed["encoder_hidden_states"] if value_context is None else value_context.to(device, dtype)
        feed["value_context"] = v
    elif value_context is not None and value_context is not ctx:
        raise PidrtError(f"{spec.name} was exported before graphs took a V context (token identities); "
                         "export it again")
    if spec.retouch_layers:
        env = axis_env(batch, sample.shape[2], sample.shape[3], spec.levels)
        feed.update(retouch_io.state_inputs(spec, batch, env, device, swap, maps))
    elif swap or maps is not None:
        raise PidrtError(f"{spec.name} has no retouch inputs but the call carries retouch edits; export the UNet "
                         "with SpecOptions(retouch_blocks=...)")
    active = scale is not None and bool(torch.count_nonzero(scale))
    if spec.method == "none":
        if payloads and active:
            raise PidrtError(f"{spec.name} has no identity inputs but the batch carries identity payloads; "
                             "export and run the UNet graph of the identity's method")
        return feed
    known = {name for _, name in spec.identity_layers}
    stray = sorted(set(payloads) - known)
    if stray:
        raise PidrtError(f"{spec.name}: payloads for layers the graph has no inputs for: {stray[:4]}")
    feed["scale"] = (torch.zeros(batch, device=device) if scale is None else scale.reshape(-1)).to(device, dtype)
    env = axis_env(batch, sample.shape[2], sample.shape[3], spec.levels)
    names = ("a", "b", "bias") if spec.method in QUERY else ("k", "v")
    for index, name in spec.identity_layers:
        p = payloads.get(name)
        if p is None:
            for prefix in names:
                feed[f"{prefix}_{index}"] = _zeros(spec, f"{prefix}_{index}", env, device)
            continue
        _check_payload(spec, name, p)
        parts = (p.branch.a, p.branch.b, p.branch.out_bias) if spec.method in QUERY else (p.keys, p.values)
        for prefix, t in zip(names, parts):
            feed[f"{prefix}_{index}"] = t.to(device, dtype)
    return feed


def example_feed(spec: ModelSpec, batch: int, height: int, width: int, seed: int = 0,
                 device="cpu") -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes (tracing, smoke runs); ids stay in a 1000-token vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.shapes_at(batch, height, width).items():
        dtype = TORCH_DTYPES[spec.input(name).dtype]
        if name == "input_ids":
            t = torch.randint(0, 1000, shape, generator=g, dtype=torch.int32)
        elif name == "timestep":
            t = torch.linspace(999, 1, shape[0])
        elif name == "images":
            t = torch.rand(shape, generator=g)
        elif name == "scale":
            t = torch.linspace(1.0, 0.0, shape[0])
        elif name.endswith("_source"):  # retouch rows / slots: valid indices
            t = torch.randint(0, 2 * shape[0], shape, generator=g)
        elif name.startswith("blend_mask") or name == "map_weights":
            t = torch.rand(shape, generator=g)
        else:
            # Small identity tensors keep softmax scores in fp16 range when tracing in half.
            identity = name[0] in "abkv" and "_" in name and name != "value_context"
            t = torch.randn(shape, generator=g) * (0.1 if identity else 1.0)
        out[name] = t.to(device=device, dtype=dtype)
    return out


def random_identity_batch(unet, spec: ModelSpec, height: int, width: int, seed: int = 0
                          ) -> tuple[dict[str, Payload], torch.Tensor]:
    """Payloads and scales for a batch of [identity 1, identity 2, no identity (scale 0)].

    SCA and IP identities come from seeded random adapters through `few_token_payloads`, EAA
    K/V are random tensors of the cached-feature shapes, so a check covers the same path a
    generation takes (adapter -> payloads -> graph inputs).
    """
    from pidrt.models.adapters import IPAdapterWeights, SCAAdapter
    from pidrt.models.branches import IPIdentity, SCAIdentity, eaa_payloads, few_token_payloads

    layers = attention_layers(unet)
    scale = torch.tensor([0.7, 1.0, 0.0])
    g = torch.Generator().manual_seed(seed)
    token_dim = unet.config.cross_attention_dim
    items: Sequence
    if spec.method == "sca":
        items = []
        for k in (1, 2):
            adapter = SCAAdapter.random(layers, token_dim, seed=seed + k)
            with torch.no_grad():
                tokens = adapter.mapping(torch.randn(1, 18, 512, generator=g))[0]
            items.append(SCAIdentity(adapter, tokens))
        return few_token_payloads(unet, layers, items + [None]), scale
    if spec.method == "ip":
        adapter = IPAdapterWeights.random(layers, token_dim, seed=seed, n_tokens=spec.n_tokens)
        with torch.no_grad():
            tokens = adapter.image_proj(torch.randn(2, adapter.image_proj.proj.in_features, generator=g))
        return few_token_payloads(unet, layers, [IPIdentity(adapter, tokens[0]), IPIdentity(adapter, tokens[1]), None]), scale
    if spec.method == "eaa":
        env = axis_env(1, height, width, spec.levels)
        per_element = []
        for _ in range(2):
            kv = {}
            for index, name in spec.identity_layers:
                shape = tuple(resolve(d, env) for d in spec.input(f"k_{index}").dims)[1:]
                kv[name] = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
            per_element.append(kv)
        return eaa_payloads(layers, per_element + [None]), scale
    return {}, torch.zeros(3)


def random_retouch_edits(spec: ModelSpec, batch: int, height: int, width: int, seed: int = 0):
    """Random retouch edits for a retouch graph: rows and slots, one mask per latent level (what
    the runtime passes), and map weights on one token per element; (swap, maps) for `unet_feed`."""
    from pidrt.models.adapters import layer_level
    from pidrt.models.retouch import SubjectMaps, SwapLayer

    g = torch.Generator().manual_seed(seed)
    env = axis_env(batch, height, width, spec.levels)
    masks: dict[int, torch.Tensor] = {}
    swap = {}
    for index, name in spec.retouch_layers:
        level = layer_level(name, spec.levels)
        n, c = env[f"tokens_{level}"], spec.input(f"swap_k_{index}").dims[2]
        masks.setdefault(level, torch.rand(batch, n, generator=g))
        sources = [torch.randint(0, 2 * batch, (batch,), generator=g) for _ in range(2)]
        slots = [torch.randn(batch, n, c, generator=g) * 0.5 for _ in range(3)]
        swap[name] = SwapLayer(*sources, masks[level], *slots)
    weights = torch.zeros(batch, spec.input("map_weights").dims[1])
    weights[torch.arange(batch), torch.randint(1, weights.shape[1], (batch,), generator=g)] = 1.0
    return swap, SubjectMaps(weights, frozenset(name for _, name in spec.map_layers))


"""The retouch's graph inputs and outputs: spec tensors, feeds from a `BranchState`, payloads in the graph.

A UNet exported with `SpecOptions(retouch_blocks=(start, end))` takes, besides its identity
inputs (docs/engines.md has the table):

- `swap_kv_source`, `swap_out_source` int32 [batch, L]: per element and edited layer, the row
  (< batch) or the element's cached slot (batch + element) its self-attention K/V and blended
  output come from; the element's own index: no edit;
- `swap_k_<i>`, `swap_v_<i>`, `swap_out_<i>` [batch, tokens, C] per edited layer i: the slots
  (K/V projected through the layer's to_k / to_v; outputs after to_out); zeros when unused;
- `blend_mask_<level>` [batch, tokens_<level>]: the weight of the element's own output; 1: no blend;
- `map_weights` [batch, 77]: the subject tokens whose attention maps the graph returns
  (zeros: none), as a second output `subject_maps` [batch, M, tokens_<map level>] of the M cross
  layers at the map level, in call order.

With own indices, masks of 1 and zero weights the graph computes the plain UNet exactly (the
gathers copy the element's own K/V, the blend adds (1 - 1) * (out - out)): one graph serves
plain and retouched requests. The stage-1 taps of the recorded layout path are not outputs:
those calls stay on the torch UNet (`RunnerPipeline.unet`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import layer_level
from pidrt.models.retouch import N_BLOCKS, LayerTap, RetouchConfig, SubjectMaps, SwapLayer, map_layers, swap_layers


def retouch_layers(layers: Sequence, blocks: tuple[int, int]) -> list:
    start, end = blocks
    if not 0 <= start < end <= N_BLOCKS:
        raise PidrtError(f"retouch_blocks must satisfy 0 <= start < end <= {N_BLOCKS}; got {blocks}")
    return swap_layers(layers, RetouchConfig(start_layer=start, end_layer=end))


def subject_map_layers(layers: Sequence, map_level: int, levels: int) -> list:
    """Every cross layer at the map level (down and up blocks); the runtime averages the ones it wants."""
    from pidrt.models.retouch import MaskConfig

    return map_layers(layers, MaskConfig(map_level=map_level, map_blocks=("down_blocks", "mid_block", "up_blocks")),
                      levels)


def spec_tensors(edited: Sequence, mapped: Sequence, levels: int, dtype: str, text_tokens: int):
    """(inputs, outputs) TensorSpecs of the retouch, after the UNet's own."""
    from pidrt.export.specs import TensorSpec

    inputs = [TensorSpec("swap_kv_source", "int32", ("batch", len(edited))),
              TensorSpec("swap_out_source", "int32", ("batch", len(edited)))]
    for layer in edited:
        tokens = f"tokens_{layer_level(layer.name, levels)}"
        inputs += [TensorSpec(f"swap_{part}_{layer.index}", dtype, ("batch", tokens, layer.channels))
                   for part in ("k", "v", "out")]
    for level in sorted({layer_level(layer.name, levels) for layer in edited}):
        inputs.append(TensorSpec(f"blend_mask_{level}", dtype, ("batch", f"tokens_{level}")))
    inputs.append(TensorSpec("map_weights", dtype, ("batch", text_tokens)))
    map_level = {layer_level(layer.name, levels) for layer in mapped}
    if len(map_level) != 1:
        raise PidrtError(f"the subject maps must come from one latent size; got levels {sorted(map_level)}")
    outputs = [TensorSpec("subject_maps", dtype, ("batch", len(mapped), f"tokens_{map_level.pop()}"))]
    return inputs, outputs


def graph_payloads(spec, feed: Mapping[str, torch.Tensor]) -> tuple[dict[str, SwapLayer], SubjectMaps]:
    """Inside the graph: the named inputs -> the processors' `SwapLayer`s and the map recorder."""
    kv_source, out_source = feed["swap_kv_source"].long(), feed["swap_out_source"].long()
    swap = {}
    for j, (index, name) in enumerate(spec.retouch_layers):
        level = layer_level(name, spec.levels)
        swap[name] = SwapLayer(kv_source[:, j], out_source[:, j], feed[f"blend_mask_{level}"],
                               feed[f"swap_k_{index}"], feed[f"swap_v_{index}"], feed[f"swap_out_{index}"])
    maps = SubjectMaps(feed["map_weights"], frozenset(name for _, name in spec.map_layers))
    return swap, maps


def graph_maps(spec, maps: SubjectMaps) -> torch.Tensor:
    return torch.stack([maps.maps[name] for _, name in spec.map_layers], dim=1)


def state_inputs(spec, batch: int, env: dict[str, int], device, swap: Mapping[str, object] | None,
                 maps: SubjectMaps | None) -> dict[str, torch.Tensor]:
    """The retouch inputs of one call from a `BranchState`'s swap and maps (defaults: no edit)."""
    from pidrt.export.inputs import TORCH_DTYPES, _zeros

    dtype = TORCH_DTYPES[spec.dtype]
    swap = dict(swap or {})
    known = {name for _, name in spec.retouch_layers}
    stray = sorted(set(swap) - known)
    if stray:
        raise PidrtError(f"{spec.name}: retouch edits for layers the graph was not exported to edit: {stray[:3]}; "
                         "export with SpecOptions(retouch_blocks=...) covering the request's layers")
    if any(isinstance(e, LayerTap) for e in swap.values()):
        raise PidrtError(f"{spec.name}: layer taps (the recorded layout path) are not graph outputs; "
                         "run those calls on the torch UNet")
    own = torch.arange(batch, dtype=torch.int32, device=device)
    sources: dict[str, list[torch.Tensor]] = {"swap_kv_source": [], "swap_out_source": []}
    masks: dict[int, torch.Tensor] = {}
    feed: dict[str, torch.Tensor] = {}
    for index, name in spec.retouch_layers:
        edit = swap.get(name)
        blends = edit is not None and edit.mask is not None
        if edit is not None and edit.keys is None and bool((edit.kv_source >= batch).any()):
            raise PidrtError(f"{spec.name}: {name} reads a cached K/V slot but the edit carries none")
        sources["swap_kv_source"].append(own if edit is None else edit.kv_source.to(device, torch.int32))
        # No mask: the processor does not blend; own output rows make the graph's blend exact too.
        sources["swap_out_source"].append(edit.out_source.to(device, torch.int32) if blends else own)
        for part, attr in (("k", "keys"), ("v", "values"), ("out", "outputs")):
            t = None if edit is None else getattr(edit, attr)
            feed[f"swap_{part}_{index}"] = (_zeros(spec, f"swap_{part}_{index}", env, device) if t is None
                                            else t.to(device, dtype))
        if blends:
            level = layer_level(name, spec.levels)
            mask = edit.mask.to(device, dtype).expand(batch, -1)
            if level in masks and not torch.equal(masks[level], mask):
                raise PidrtError(f"{spec.name}: the edited layers at latent level {level} carry different blend "
                                 "masks; the graph takes one mask per level")
            masks[level] = mask
    for level in sorted({layer_level(name, spec.levels) for _, name in spec.retouch_layers}):
        feed[f"blend_mask_{level}"] = masks[level].contiguous() if level in masks else \
            torch.ones(batch, env[f"tokens_{level}"], dtype=dtype, device=device)
    for key, columns in sources.items():
        feed[key] = torch.stack(columns, dim=1)
        if bool((feed[key] < 0).any()) or bool((feed[key] >= 2 * batch).any()):
            raise PidrtError(f"{spec.name}: {key} must index rows or slots in 0..{2 * batch - 1}")
    feed["map_weights"] = (torch.zeros(batch, spec.input("map_weights").dims[1], dtype=dtype, device=device)
                           if maps is None else maps.weights.to(device, dtype))
    return feed


def read_maps(spec, maps: SubjectMaps | None, output: torch.Tensor) -> None:
    """Put a graph's `subject_maps` output into the state's recorder, as the torch layers would."""
    if maps is None:
        return
    for j, (_, name) in enumerate(spec.map_layers):
        if name in maps.layers:
            maps.maps[name] = output[:, j]

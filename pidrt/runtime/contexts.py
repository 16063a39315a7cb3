"""Which encoded text each UNet row's cross-attention reads, per step: the K and the V context.

Ordinary prompts read their own encoding for both. A token identity (pidrt.models.tokens) makes
its row read, for K and for V, the prompt encoded with its placeholder replaced by the K or V
tokens of the current stage: the stage of the step's timestep ("steps" reading), or of each
cross layer ("layers" reading, then every row gets per-layer contexts).

`plan_contexts` lists the texts to encode once per generation: the CFG negatives and prompts in
the order the pipeline always used (so a batch without token identities encodes exactly as
before; a token row's slot holds its first token text), then each other distinct token text.
`ContextPlan.at(t, table)` turns the encoded table into a UNet call's `encoder_hidden_states`
and the `BranchState.value_context` / `layer_contexts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.attention import LayerContexts
from pidrt.models.tokens import TextKey, TokenIdentity, has_placeholder


@dataclass
class _TokenRow:
    identity: TokenIdentity
    keys: torch.Tensor  # text rows: [stages] ("steps") or [cross layers] ("layers")
    values: torch.Tensor


@dataclass
class ContextPlan:
    """texts: what to encode, in order; the first `batch` are the UNet rows' own texts.
    rows: UNet batch row -> its token identity's text rows; layers: the cross layers, in column
    order, when a row uses the "layers" reading."""

    texts: list[TextKey]
    batch: int
    rows: dict[int, _TokenRow] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    # The last call's (rows, table, prefix) and result: steps of one stage reuse the same tensors
    # (no gather per step, and CUDA-graph slots see an unchanged source).
    _last: tuple | None = field(default=None, repr=False)

    def rows_at(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, X] text rows that the K and the V context of every batch row read at `timestep`
        (X = number of cross layers when a row reads per layer, else 1)."""
        k = torch.arange(self.batch)[:, None].repeat(1, len(self.layers) or 1)
        v = k.clone()
        for b, row in self.rows.items():
            if row.identity.reading == "steps":
                s = row.identity.stage_at(timestep)
                k[b], v[b] = row.keys[s], row.values[s]
            else:
                k[b], v[b] = row.keys, row.values
        return k, v

    def at(self, timestep: int, table: torch.Tensor, prefix: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, LayerContexts | None]:
        """(encoder_hidden_states, value_context, layer_contexts) of a UNet call at `timestep`.

        table: the encodings of `texts`; prefix: rows that go before the batch (EAA reference
        rows, which read their own captions).
        """
        k, v = self.rows_at(timestep)
        if self._last is not None and self._last[1] is table and self._last[2] is prefix \
                and torch.equal(self._last[0][0], k) and torch.equal(self._last[0][1], v):
            return self._last[3]
        result = self._contexts(k.to(table.device), v.to(table.device), table, prefix)
        self._last = ((k, v), table, prefix, result)
        return result

    def _contexts(self, k, v, table, prefix):
        if not self.rows:
            return (table if prefix is None else torch.cat([prefix, table])), None, None
        if prefix is not None:
            extra = torch.arange(len(table), len(table) + len(prefix), device=table.device)[:, None]
            table = torch.cat([table, prefix])
            k, v = torch.cat([extra.expand(-1, k.shape[1]), k]), torch.cat([extra.expand(-1, v.shape[1]), v])
        ctx = table[k[:, 0]]
        if self.layers:
            cols = range(len(self.layers))
            return ctx, None, LayerContexts(table, {n: k[:, j] for n, j in zip(self.layers, cols)},
                                            {n: v[:, j] for n, j in zip(self.layers, cols)})
        return ctx, (None if torch.equal(k, v) else table[v[:, 0]]), None


def plan_contexts(prompts: Sequence[str], negatives: Sequence[str] | None,
                  tokens: Sequence[TokenIdentity | None], cross_layers: Sequence[str],
                  text_dim: int | None = None) -> ContextPlan:
    """The plan of one generation: `negatives` (None without CFG) and `prompts`, one token identity
    (or None) per prompt. A token identity's prompt must contain its placeholder."""
    texts: list[TextKey] = list(negatives or []) + list(prompts)
    plan = ContextPlan(texts, len(texts))
    if all(t is None for t in tokens):
        return plan
    index: dict[TextKey, int] = {}

    def row(text: TextKey) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    if any(t is not None and t.reading == "layers" for t in tokens):
        plan.layers = tuple(cross_layers)
    offset = len(negatives or [])
    for j, (prompt, identity) in enumerate(zip(prompts, tokens)):
        if identity is None:
            continue
        identity.check(text_dim if text_dim is not None else identity.dim, cross_layers)
        if not has_placeholder(prompt, identity.placeholder):
            raise PidrtError(f"prompt {prompt!r} does not contain the token identity's placeholder "
                             f"{identity.placeholder!r}")
        texts_of = [identity.texts(prompt, s) for s in range(identity.stages)]
        # The row's own slot holds its first K text instead of the bare prompt, which it never
        # reads: no wasted encode, and a textual inversion encodes a batch of the usual size.
        texts[offset + j] = texts_of[0][0]
        index.setdefault(texts_of[0][0], offset + j)
        pairs = [tuple(row(t) for t in pair) for pair in texts_of]
        if identity.reading == "layers":
            stage = dict(identity.layer_stages)
            pairs = [pairs[stage[name]] for name in plan.layers]
        plan.rows[offset + j] = _TokenRow(identity, torch.tensor([p[0] for p in pairs]),
                                          torch.tensor([p[1] for p in pairs]))
    return plan

"""Token identities: a subject as learned token embeddings that stand in for a placeholder word.

SeFi-IDE represents a subject as several per-stage token pairs whose two features are
disentangled: one feeds the cross-attention keys, the other the values (methods.md section 4).
Textual inversion is the degenerate case (one stage, K = V), ProSpect / P+ the K = V case with one
token per stage. None of them changes the UNet: they change the contexts its cross-attention
reads. This module is the text side of that:

- `TokenIdentity`: K and V tokens per stage and the stages' reading (step ranges or layer groups);
- `TokenText`: a prompt whose placeholder stands for one set of vectors, hashable, so a text
  cache keys its encoding like an ordinary prompt's;
- `encode_texts`: ordinary prompts and `TokenText`s through the text encoder in one call, the
  placeholder positions' token embeddings replaced by the vectors.

A placeholder is matched case-insensitively (both tokenizers lower-case) and as a whole word when
it starts or ends with a word character, so `me` does not match inside `meadow`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from pidrt.errors import PidrtError

READINGS = ("steps", "layers")
MAX_PLACEHOLDER = 64


def check_placeholder(placeholder: str) -> str:
    if (not isinstance(placeholder, str) or not placeholder or len(placeholder) > MAX_PLACEHOLDER
            or placeholder != placeholder.strip() or not placeholder.isprintable()):
        raise PidrtError(f"placeholder must be 1..{MAX_PLACEHOLDER} printable characters without surrounding "
                         f"spaces, e.g. '<me>'; got {placeholder!r}")
    return placeholder


def placeholder_pattern(placeholder: str) -> re.Pattern:
    check_placeholder(placeholder)
    head = r"(?<!\w)" if re.match(r"\w", placeholder[0]) else ""
    tail = r"(?!\w)" if re.match(r"\w", placeholder[-1]) else ""
    return re.compile(head + re.escape(placeholder) + tail, re.IGNORECASE)


def has_placeholder(prompt: str, placeholder: str) -> bool:
    return placeholder_pattern(placeholder).search(prompt) is not None


def vectors_digest(vectors: torch.Tensor) -> str:
    t = vectors.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenText:
    """`prompt` with every `placeholder` standing for `vectors` [n, D]; equal and hashed by
    (prompt, placeholder, digest of the vectors), so it keys a text-embedding cache."""

    prompt: str
    placeholder: str
    vectors: torch.Tensor = field(compare=False, repr=False)
    digest: str = field(default="", init=False)

    def __post_init__(self):
        if self.vectors.dim() != 2 or not self.vectors.shape[0]:
            raise PidrtError(f"placeholder vectors must be [n, dim] with n >= 1; got {tuple(self.vectors.shape)}")
        object.__setattr__(self, "digest", vectors_digest(self.vectors))


TextKey = Union[str, TokenText]


@dataclass(frozen=True, eq=False)
class TokenIdentity:
    """K and V tokens per stage: keys, values [S, n, D] (textual inversion: S = 1, keys == values).

    reading "steps" (default, ProSpect's): `step_bounds` are S - 1 descending diffusion timesteps;
    a denoising step at timestep t is in stage sum(t < b for b in step_bounds), so stage 0 runs
    first and the boundaries do not depend on the step count or the scheduler.
    reading "layers" (P+'s): `layer_stages` gives the stage of every cross-attention layer by name;
    the same tokens on every step.
    base_model: fingerprint of the base model the tokens were trained for ("" unknown).
    """

    placeholder: str
    keys: torch.Tensor
    values: torch.Tensor
    reading: str = "steps"
    step_bounds: tuple[int, ...] = ()
    layer_stages: tuple[tuple[str, int], ...] = ()
    base_model: str = ""
    name: str = ""

    def __post_init__(self):
        check_placeholder(self.placeholder)
        k, v = self.keys, self.values
        if k.dim() != 3 or k.shape != v.shape or 0 in k.shape:
            raise PidrtError(f"token identity needs keys and values of one shape [stages, tokens, dim]; got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise PidrtError("token identity has non-finite token values")
        stages = k.shape[0]
        if self.reading not in READINGS:
            raise PidrtError(f"unknown token reading {self.reading!r}; choose one of {READINGS}")
        if self.reading == "steps":
            b = self.step_bounds
            ints = all(isinstance(x, int) and x >= 0 for x in b)
            if len(b) != stages - 1 or not ints or any(x <= y for x, y in zip(b, b[1:])):
                raise PidrtError(f"{stages} step stages need {stages - 1} strictly descending timestep bounds >= 0; "
                                 f"got {list(b)}")
            if self.layer_stages:
                raise PidrtError("layer_stages belong to the 'layers' reading, not 'steps'")
        else:
            if self.step_bounds:
                raise PidrtError("step_bounds belong to the 'steps' reading, not 'layers'")
            used = {s for _, s in self.layer_stages}
            if not self.layer_stages or not used <= set(range(stages)) or \
                    len({n for n, _ in self.layer_stages}) != len(self.layer_stages):
                raise PidrtError(f"the 'layers' reading needs each cross layer named once with a stage in "
                                 f"0..{stages - 1}; got {list(self.layer_stages)[:4]}...")

    @property
    def stages(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def textual_inversion(cls, placeholder: str, vectors: torch.Tensor, **kw) -> TokenIdentity:
        """One stage, K = V, every step: what a textual-inversion embedding [n, D] is."""
        v = vectors[None] if vectors.dim() == 2 else vectors[None, None]
        return cls(placeholder, v, v, **kw)

    def stage_at(self, timestep: int) -> int:
        """The stage of a denoising step (the 'steps' reading)."""
        return sum(int(timestep) < b for b in self.step_bounds)

    def texts(self, prompt: str, stage: int) -> tuple[TokenText, TokenText]:
        """(K text, V text) of `prompt` for `stage`; one object when K and V tokens are equal."""
        k = TokenText(prompt, self.placeholder, self.keys[stage])
        v = k if torch.equal(self.keys[stage], self.values[stage]) else \
            TokenText(prompt, self.placeholder, self.values[stage])
        return k, v

    def check(self, text_dim: int, cross_layers: Sequence[str] | None = None, base_model: str | None = None) -> None:
        """Refuse an identity the models cannot run: token width, layer names, base model."""
        if self.dim != text_dim:
            raise PidrtError(f"token identity {self.name or self.placeholder!r} has {self.dim}-wide tokens; this "
                             f"text encoder takes {text_dim}")
        if self.reading == "layers" and cross_layers is not None:
            named = {n for n, _ in self.layer_stages}
            missing, unknown = sorted(set(cross_layers) - named), sorted(named - set(cross_layers))
            if missing or unknown:
                raise PidrtError(f"token identity {self.name or self.placeholder!r}: layer stages do not match the "
                                 f"UNet's cross layers (missing {missing[:3]}, unknown {unknown[:3]})")
        if base_model and self.base_model and self.base_model != base_model:
            raise PidrtError(f"token identity {self.name or self.placeholder!r} was trained for base model "
                             f"{self.base_model[:16]}..., not the loaded {base_model[:16]}...")


# -------------------------------------------------------------------------------- encoding

def placeholder_ids(tokenizer, text: TokenText) -> tuple[torch.Tensor, list[int]]:
    """ids [L] of `text` with n placeholder slots per occurrence, and the slots' positions.

    The prompt is split at the placeholder and each piece tokenized without start/end tokens, so
    the words around it get the ids a plain prompt would give them. Words past the context are
    cut as the tokenizer cuts a long prompt; a placeholder slot past it is an error.
    """
    words = getattr(tokenizer, "words", None)
    if words is None:
        raise PidrtError(f"{type(tokenizer).__name__} cannot place token identities (it has no words())")
    pieces = placeholder_pattern(text.placeholder).split(text.prompt)
    if len(pieces) == 1:
        raise PidrtError(f"prompt {text.prompt!r} does not contain the placeholder {text.placeholder!r}")
    n = text.vectors.shape[0]
    ids, positions = [tokenizer.bos], []
    for i, piece in enumerate(pieces):
        if i:
            positions += range(len(ids), len(ids) + n)
            # The slot's embedding is replaced, so its id only must not be the end token (CLIP pools there).
            ids += [tokenizer.bos] * n
        ids += words(piece)
    room = tokenizer.length - 1
    if positions[-1] >= room:
        raise PidrtError(f"prompt {text.prompt!r} is too long: its placeholder {text.placeholder!r} ({n} tokens) "
                         f"ends past the {room - 1} tokens of the text context")
    ids = ids[:room] + [tokenizer.eos]
    ids += [tokenizer.pad] * (tokenizer.length - len(ids))
    return torch.tensor(ids, dtype=torch.int64), positions


def encode_texts(text_encoder, tokenizer, texts: Sequence[TextKey], device=None) -> torch.Tensor:
    """last_hidden_state [B, L, D] of ordinary prompts and `TokenText`s, in one encoder call.

    Without `TokenText`s this is exactly `text_encoder(tokenizer(texts))`. With them, a forward hook
    on the token embedding puts each text's vectors at its placeholder slots; every other row and
    position is the encoder's own computation, so ordinary rows equal a plain encode of the batch.
    """
    texts = list(texts)
    plain = tokenizer([t if isinstance(t, str) else "" for t in texts])
    slots = []
    for row, t in enumerate(texts):
        if isinstance(t, TokenText):
            plain[row], positions = placeholder_ids(tokenizer, t)
            slots.append((row, positions, t.vectors))
    ids = plain.to(device)
    if not slots:
        return text_encoder(ids).last_hidden_state
    embedding = text_encoder.get_input_embeddings()
    if embedding.embedding_dim != slots[0][2].shape[-1]:
        raise PidrtError(f"token vectors are {slots[0][2].shape[-1]} wide; the text encoder's embeddings "
                         f"{embedding.embedding_dim}")

    def inject(module, args, out):
        # The hook sees every call of the shared embedding: act only on this call's ids (the
        # encoder passes a view of them), so concurrent plain encodes are left alone.
        if args[0].data_ptr() != ids.data_ptr() or args[0].shape != ids.shape:
            return None
        out = out.clone()
        for row, positions, vectors in slots:
            n = vectors.shape[0]
            for k, pos in enumerate(positions):
                out[row, pos] = vectors[k % n].to(out.device, out.dtype)
        return out

    handle = embedding.register_forward_hook(inject)
    try:
        return text_encoder(ids).last_hidden_state
    finally:
        handle.remove()

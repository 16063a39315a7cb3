"""Tokenizers: real CLIP BPE from a model folder, or an offline word-hash tokenizer for `tiny`.

Both return the same thing: int64 ids of shape [B, 77] padded with the end token, which is what
the CLIP text encoder of SD1.5 consumes. Both also give the ids of a piece of text without the
start/end tokens (`words`) and their special ids, which is what a prompt with a token-identity
placeholder is assembled from (pidrt.models.tokens).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import torch

from pidrt.errors import FormatError
from pidrt.models.presets import TextConfig


class Tokenizer(Protocol):
    length: int
    bos: int
    eos: int
    pad: int

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def words(self, text: str) -> list[int]:
        """The ids of `text` without start/end tokens, untruncated."""


class HashTokenizer:
    """Offline tokenizer for random-weight presets: each lower-cased word maps to a stable id.

    It is no substitute for CLIP BPE with real weights (those ship their own tokenizer), but it
    is deterministic across runs and machines, so seeded images are reproducible.
    """

    def __init__(self, config: TextConfig):
        self.length = config.max_position_embeddings
        self.bos = config.bos_token_id
        self.eos = config.eos_token_id
        self.pad = config.pad_token_id
        # Ids below the special tokens are free for words.
        self.n_words = min(self.bos, self.eos, self.pad)

    def _word_id(self, word: str) -> int:
        return zlib.crc32(word.encode("utf-8")) % self.n_words

    def words(self, text: str) -> list[int]:
        return [self._word_id(w) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), self.length), self.pad, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            tokens = [self.bos, *self.words(prompt)[: self.length - 2], self.eos]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


class ClipTokenizer:
    """CLIP BPE read from a diffusers folder's `tokenizer/` (vocab.json + merges.txt), offline."""

    def __init__(self, folder: Path, length: int = 77):
        from transformers import CLIPTokenizer

        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FormatError(f"{folder / name}: missing; a CLIP tokenizer folder needs vocab.json and merges.txt")
        self._tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.length = length
        self.bos, self.eos, self.pad = self._tok.bos_token_id, self._tok.eos_token_id, self._tok.pad_token_id

    def words(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False).input_ids

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = self._tok(
            list(prompts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        return out.input_ids

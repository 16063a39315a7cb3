"""Tokenizers: real CLIP BPE from a model folder, or an offline word-hash tokenizer for `tiny`.

Both return the same thing: int64 ids of shape [B, 77] padded with the end token, which is what
the CLIP text encoder of SD1.5 consumes.
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
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor: ...


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

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), self.length), self.pad, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"\w+|[^\w\s]", prompt.lower())[: self.length - 2]
            tokens = [self.bos, *(self._word_id(w) for w in words), self.eos]
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

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = self._tok(
            list(prompts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        return out.input_ids

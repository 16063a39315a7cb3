"""IP-Adapter's image-projection models: an image (or face) embedding to n context tokens.

Module and parameter names follow the published `image_proj.*` keys so files load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from pidrt.errors import FormatError
from pidrt.models.statedict import strict_load


class ImageProjModel(nn.Module):
    """The 4-token model of `ip-adapter_sd15`: Linear(embed, n * 768) then LayerNorm(768)."""

    def __init__(self, cross_attention_dim: int = 768, embeddings_dim: int = 1024, n_tokens: int = 4):
        super().__init__()
        self.n_tokens = n_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(embeddings_dim, n_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds).reshape(-1, self.n_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjModel(nn.Module):
    """The FaceID model: an ArcFace embedding (512) through Linear-GELU-Linear to n tokens, then LayerNorm."""

    def __init__(self, cross_attention_dim: int = 768, embeddings_dim: int = 512, n_tokens: int = 4):
        super().__init__()
        self.n_tokens = n_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(embeddings_dim, embeddings_dim * 2),
            nn.GELU(),
            nn.Linear(embeddings_dim * 2, cross_attention_dim * n_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds).reshape(-1, self.n_tokens, self.cross_attention_dim)
        return self.norm(tokens)


def image_proj_from_state(state: dict[str, torch.Tensor], cross_attention_dim: int) -> nn.Module:
    """Pick and size the projection model from the keys and shapes of an `image_proj` state dict."""
    keys = set(state)
    if {"proj.weight", "norm.weight"} <= keys:
        out, embed = state["proj.weight"].shape
        model = ImageProjModel(cross_attention_dim, embed, out // cross_attention_dim)
    elif {"proj.0.weight", "proj.2.weight", "norm.weight"} <= keys:
        embed = state["proj.0.weight"].shape[1]
        model = MLPProjModel(cross_attention_dim, embed, state["proj.2.weight"].shape[0] // cross_attention_dim)
    else:
        raise FormatError(
            f"image_proj keys {sorted(keys)} match neither the linear+LayerNorm model "
            "(proj.weight, norm.*) nor the FaceID MLP model (proj.0.*, proj.2.*, norm.*)"
        )
    strict_load(model, state, "image_proj")
    return model

"""The retouch's blend mask: thresholded subject maps, refined by an optional user foreground mask.

The paper (sec. 3.2.2, "Adaptive mask blending") builds the mask M that weighs the target's own
self-attention output against the layout path's (M = 1: the target's, M = 0: the layout's):

1. M_ca: the averaged cross-attention map of the subject tokens, min-max normalised per image
   and thresholded (MasaCtrl's / DreamMatcher's `aggregate_cross_attn_map` and `thres`), resized
   to the working resolution with nearest neighbours (MasaCtrl's `F.interpolate` default).
2. With a user foreground mask U (the paper: Segment-Anything on the layout image; pidrt takes a
   mask and ships no segmenter), the paper's rule, whose equations lost their symbols in the
   text; pidrt reads it as (docs/retouch.md names the gaps):
     F = M_ca AND U                 "discard noisy regions of M_ca based on" U
     D = Normalize(EDT(U)) on U     Euclidean distance to the background, mapped to [0.5, 1]
     M = max(D, F)                  "add the area with 1s" of the confident map at full weight
   Without U, M = M_ca.
3. Connected sets of M > 0 (8-connected) smaller than `min_component` of the pixels are removed.

The working resolution is U's when given (the paper resizes M_ca to the SAM mask), else the
latent's. `level_masks` then area-averages M to each self-attention layer's token grid ("M is
resized to match the spatial dimension of the latent representations").

The distance transform and the labelling are scipy.ndimage's (the `face` extra), imported when
a mask is made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pidrt.errors import PidrtError, require
from pidrt.models.retouch import MaskConfig

_EIGHT = np.ones((3, 3), dtype=bool)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-element min-max to [0, 1] over the spatial axes of [B, h, w]; a constant map gives 0."""
    flat = maps.float().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.view(maps.shape)


def threshold_maps(maps: torch.Tensor, side: tuple[int, int], threshold: float, size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w] averaged maps -> binary [B, H, W] at `size`: normalise, threshold, nearest resize."""
    b = maps.shape[0]
    binary = (normalise_maps(maps.view(b, *side)) >= threshold).float()
    return F.interpolate(binary[:, None], size=size, mode="nearest")[:, 0]


def _ndimage():
    return require("scipy.ndimage", "face")


def distance_weights(user: np.ndarray) -> np.ndarray:
    """Normalise(EDT(U)): on U's pixels the distance to the nearest background pixel mapped to [0.5, 1], 0 off U.

    A mask without background has no distances: its weights are 1. Equal distances (a line) give 1.
    """
    user = user.astype(bool)
    if not user.any():
        return np.zeros(user.shape, dtype=np.float32)
    if user.all():
        return np.ones(user.shape, dtype=np.float32)
    dist = _ndimage().distance_transform_edt(user)
    inside = dist[user]
    lo, hi = inside.min(), inside.max()
    scaled = np.ones_like(dist) if hi == lo else 0.5 + 0.5 * (dist - lo) / (hi - lo)
    return np.where(user, scaled, 0.0).astype(np.float32)


def remove_small_components(mask: np.ndarray, min_component: float) -> np.ndarray:
    """Zero the 8-connected sets of mask > 0 whose pixel count is below min_component * mask.size."""
    if min_component <= 0:
        return mask
    labels, count = _ndimage().label(mask > 0, structure=_EIGHT)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < min_component * mask.size
    small[0] = False  # the background is not a set
    return np.where(small[labels], 0.0, mask).astype(mask.dtype)


def refine(ca: np.ndarray, user: np.ndarray | None, min_component: float) -> np.ndarray:
    """One element's M from its binary M_ca and optional binary U (same [H, W]); float32 in [0, 1]."""
    if user is None:
        mask = ca.astype(np.float32)
    else:
        confident = np.logical_and(ca > 0, user > 0).astype(np.float32)
        mask = np.maximum(distance_weights(user > 0), confident)
    return remove_small_components(mask, min_component)


def blend_masks(maps: torch.Tensor, map_side: tuple[int, int], latent_side: tuple[int, int], config: MaskConfig,
                user_masks: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """[B, h*w] averaged subject maps -> each element's M (float32, CPU) at its working resolution.

    user_masks: per element None or a binary [H, W] tensor; the working resolution is the user
    mask's where given, else `latent_side`.
    """
    user_masks = user_masks or [None] * maps.shape[0]
    if len(user_masks) != maps.shape[0]:
        raise PidrtError(f"{len(user_masks)} user masks for {maps.shape[0]} maps")
    out = []
    for b, user in enumerate(user_masks):
        size = latent_side if user is None else tuple(user.shape[-2:])
        ca = threshold_maps(maps[b:b + 1].detach().cpu(), map_side, config.threshold, size)[0].numpy()
        u = None if user is None else (user.detach().cpu().numpy() > 0.5)
        out.append(torch.from_numpy(refine(ca, u, config.min_component)))
    return out


def level_masks(masks: list[torch.Tensor], sides: dict[int, tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Each element's M [H, W] area-averaged to each layer grid: {tokens: [B, tokens]} (sides: tokens -> (h, w))."""
    return {n: torch.cat([F.adaptive_avg_pool2d(m[None, None].float(), side).flatten(1) for m in masks])
            for n, side in sides.items()}

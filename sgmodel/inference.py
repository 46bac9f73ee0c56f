"""Mask from text (DESIGN §2): M = Σ_k w_k · A_k on the token grid -> bilinear upsampling to the image
size -> min-max normalisation -> threshold 0.5.

Everything is batched: maps that share an output size are processed as one tensor, so the Python
loops run over distinct sizes only.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

Size = tuple[int, int]


def combine_slot_maps(weights: torch.Tensor, slot_maps: torch.Tensor, text_image_index: torch.Tensor) -> torch.Tensor:
    """weights (T, K), slot_maps (B, K, ...), text_image_index (T,) -> (T, ...): Σ_k w[t,k] · A[img(t),k]."""
    own = slot_maps[text_image_index]  # (T, K, ...)
    w = weights.to(own.dtype).view(*weights.shape, *([1] * (own.dim() - 2)))  # (T, K, 1, ...)
    return (w * own).sum(dim=1)  # elementwise, so autocast keeps the maps' own precision


def group_by_size(sizes: list[Size]) -> dict[Size, list[int]]:
    """Indices of the items of each distinct (H, W), in first-seen order."""
    groups: dict[Size, list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        groups[(int(size[0]), int(size[1]))].append(i)
    return dict(groups)


def upsample_group(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """maps (G, h, w) -> (G, H, W) float, bilinear (half-pixel centres, as image resizing does)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def upsample_maps(maps: torch.Tensor, sizes: list[Size]) -> list[torch.Tensor]:
    """maps (T, h, w), one (H, W) per map -> list of T float maps (H_t, W_t)."""
    out: list[torch.Tensor | None] = [None] * len(sizes)
    for size, idx in group_by_size(sizes).items():
        for i, up in zip(idx, upsample_group(maps[idx], size)):
            out[i] = up
    return out  # type: ignore[return-value]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (G, H, W) to [0, 1]; a flat map becomes all zeros (no NaN)."""
    flat = maps.float().flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    norm = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return norm.view_as(maps)


def _per_group(maps, fn):
    """Apply fn to a (G, H, W) tensor, or to a list of (H, W) maps grouped by size (same order back)."""
    if isinstance(maps, torch.Tensor):
        return fn(maps)
    out = [None] * len(maps)
    for size, idx in group_by_size([tuple(m.shape[-2:]) for m in maps]).items():
        for i, result in zip(idx, fn(torch.stack([maps[i] for i in idx]))):
            out[i] = result
    return out


def masks_from_maps(maps, threshold: float = 0.5):
    """Response maps -> bool masks: min-max normalise per map, then > threshold.

    Takes a (G, H, W) tensor (returns a bool tensor) or a list of (H, W) maps (returns a list).
    """
    return _per_group(maps, lambda group: normalize_maps(group) > threshold)


def argmax_points(maps):
    """(y, x) of each map's maximum (first one on ties): (G, 2) long for a tensor, a list of (2,) for a list."""

    def points(group: torch.Tensor) -> torch.Tensor:
        flat = group.flatten(1).argmax(dim=1)  # (G,)
        width = group.shape[-1]
        return torch.stack([flat // width, flat % width], dim=1)

    return _per_group(maps, points)


def predict_masks(maps: torch.Tensor, sizes: list[Size], threshold: float = 0.5) -> list[torch.Tensor]:
    """Token-grid maps (T, h, w) -> one bool mask per map at its image size (upsample, normalise, threshold)."""
    out: list[torch.Tensor | None] = [None] * len(sizes)
    for size, idx in group_by_size(sizes).items():
        for i, mask in zip(idx, masks_from_maps(upsample_group(maps[idx], size), threshold)):
            out[i] = mask
    return out  # type: ignore[return-value]

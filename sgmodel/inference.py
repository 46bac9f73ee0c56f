"""Mask from text (DESIGN §2): M = Σ_k w_k · A_k on the token grid -> bilinear upsampling to the image
size -> min-max normalisation -> threshold 0.5.

Everything is batched: maps that share an output size are processed as one tensor, so the Python
loops run over distinct sizes only.
"""

from __future__ import annotations

from collections import defaultdict

import torch

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


def _interpolation_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation with half-pixel centres (align_corners=False),
    the same sample positions and edge clamping as F.interpolate(mode="bilinear")."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.float()


def upsample_group(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """maps (G, h, w) -> (G, H, W) float, bilinear (half-pixel centres, as image resizing does).

    Bilinear resizing is separable, so it runs as two small matmuls (rows, then columns) instead of
    F.interpolate, whose single-channel CPU kernel is several times slower at mask resolution.
    """
    maps = maps.float()
    (h, w), (H, W) = maps.shape[-2:], tuple(size)
    if (h, w) == (H, W):
        return maps
    rows = _interpolation_matrix(H, h).to(maps.device)  # (H, h)
    cols = _interpolation_matrix(W, w).to(maps.device)  # (W, w)
    return rows @ maps @ cols.T  # (G, H, W)


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


def threshold_maps(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(G, H, W) -> bool (G, H, W): min-max normalise each map, then > threshold, in one pass.

    (x - min) / (max - min) > t  is  x > min + t·(max - min): no normalised copy and no division,
    which matters at the original mask resolution (millions of pixels per phrase). A flat map
    (max = min) gives an empty mask, as normalize_maps does.
    """
    flat = maps.float().flatten(1)  # (G, H*W)
    low, high = torch.aminmax(flat, dim=1, keepdim=True)  # (G, 1) each
    return (flat > low + threshold * (high - low)).view(maps.shape)


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
    return _per_group(maps, lambda group: threshold_maps(group, threshold))


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

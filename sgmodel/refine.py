"""Image-guided refinement of response maps: sharper masks without mask labels.

The response map lives on the token grid (stride 16 for the encoders here), so bilinear upsampling
alone gives round blobs whose edges ignore the picture, and mIoU stays capped by the grid (the
best-slot oracle). Refinement lets the picture decide the edges: the map is upsampled to the model's
input size and then, for a few iterations, every pixel takes an average of its neighbours' values
(3x3 neighbourhoods at several dilations) weighted by how alike they look. The weights are a softmax
over the neighbours of

    -|I_p - I_q| / (scale * local colour spread)      (mean over the colour channels)

so values flow freely inside regions of one colour and barely across an edge. Nothing is learned:
it is pixel-adaptive mask refinement (PAMR; Araslanov & Roth, "Single-stage semantic segmentation
from image labels", CVPR 2020), used there on class activation maps for the same reason.

Shapes: images (B, 3, H, W) uint8 or float, maps (T, H, W), text_image_index (T,) -> (T, H, W).
Each image's affinities are computed once and shared by all its phrases; the neighbours are visited
one offset at a time, so memory stays at a few maps per phrase whatever the dilations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbours of a 3x3 window at each dilation, as (dy, dx)."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (..., H, W) -> y with y[..., i, j] = x[..., clamp(i + dy), clamp(j + dx)] (edges replicated)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).add(dy).clamp(0, h - 1)
    cols = torch.arange(w, device=x.device).add(dx).clamp(0, w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def colour_affinity(images: torch.Tensor, dilations: Sequence[int], scale: float = 0.1) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> neighbour weights (B, P, H, W), summing to 1 over the P neighbours."""
    offsets = neighbour_offsets(dilations)
    neighbours = torch.stack([shifted(images, dy, dx) for dy, dx in offsets], dim=2)  # (B, 3, P, H, W)
    spread = neighbours.std(dim=2, keepdim=True) + 1e-3  # (B, 3, 1, H, W): local colour spread
    distance = ((neighbours - images.unsqueeze(2)).abs() / (scale * spread)).mean(dim=1)  # (B, P, H, W)
    return (-distance).softmax(dim=1)


def refine_maps(maps: torch.Tensor, images: torch.Tensor, text_image_index: torch.Tensor, iterations: int = 10,
                dilations: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """Token-grid maps (T, h, w) -> refined maps (T, H, W) at the images' size (H, W).

    The maps are upsampled bilinearly and min-max normalised first, so every phrase's map spans [0, 1]
    before the averaging (each iteration is a convex combination: it stays in [0, 1]).
    """
    pixels = images.float()
    if images.dtype == torch.uint8:
        pixels = pixels / 255.0
    size = tuple(pixels.shape[-2:])
    up = F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)  # (T, H, W)
    low = up.flatten(1).amin(dim=1).view(-1, 1, 1)
    high = up.flatten(1).amax(dim=1).view(-1, 1, 1)
    refined = (up - low) / (high - low).clamp(min=1e-12)
    if iterations == 0 or refined.shape[0] == 0:
        return refined
    offsets = neighbour_offsets(dilations)
    affinity = colour_affinity(pixels, dilations)  # (B, P, H, W): per image, shared by its phrases
    index = text_image_index.to(pixels.device)
    for _ in range(iterations):
        step = torch.zeros_like(refined)
        for p, (dy, dx) in enumerate(offsets):
            step += affinity[index, p] * shifted(refined, dy, dx)  # (T, H, W)
        refined = step
    return refined

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

Shapes: images (B, 3, H, W) uint8 or float, maps (T, h, w), text_image_index (T,) -> (T, H, W).
Each image's affinities are computed once and shared by all its phrases; the neighbours are slices of
one padded copy, visited one offset at a time, so memory stays at a few maps per phrase.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sgmodel.inference import upsample_group


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbours of a 3x3 window at each dilation, as (dy, dx)."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _neighbours(x: torch.Tensor, offsets: list[tuple[int, int]]):
    """Views of x (..., H, W) shifted by each (dy, dx), edges replicated: y[..., i, j] = x[..., clamp(i + dy), clamp(j + dx)].

    One replicate-padded copy per call; each neighbour is a slice of it (no per-offset copy).
    """
    h, w = x.shape[-2:]
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    lead = x.shape[:-2]
    padded = F.pad(x.reshape(-1, 1, h, w), (reach, reach, reach, reach), mode="replicate").view(*lead, h + 2 * reach, w + 2 * reach)
    for dy, dx in offsets:
        yield padded[..., reach + dy:reach + dy + h, reach + dx:reach + dx + w]


def colour_affinity(image: torch.Tensor, dilations: Sequence[int], scale: float = 0.1) -> torch.Tensor:
    """image (3, H, W) in [0, 1] -> neighbour weights (P, H, W), summing to 1 over the P neighbours."""
    neighbours = torch.stack(list(_neighbours(image, neighbour_offsets(dilations))), dim=1)  # (3, P, H, W)
    spread = neighbours.std(dim=1, keepdim=True) + 1e-3  # (3, 1, H, W): local colour spread
    distance = ((neighbours - image.unsqueeze(1)).abs() / (scale * spread)).mean(dim=0)  # (P, H, W)
    return (-distance).softmax(dim=0)


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
    up = upsample_group(maps, size)  # (T, H, W): the prediction rule's own upsampling step
    low = up.flatten(1).amin(dim=1).view(-1, 1, 1)
    high = up.flatten(1).amax(dim=1).view(-1, 1, 1)
    refined = (up - low) / (high - low).clamp(min=1e-12)
    if iterations == 0 or refined.shape[0] == 0:
        return refined
    offsets = neighbour_offsets(dilations)
    index = text_image_index.to(pixels.device)
    for b in index.unique().tolist():  # an image's affinities once, shared by all its phrases
        own = (index == b).nonzero().flatten()
        affinity = colour_affinity(pixels[b], dilations)  # (P, H, W)
        m = refined[own]  # (t, H, W)
        for _ in range(iterations):
            step = torch.zeros_like(m)
            for p, neighbour in enumerate(_neighbours(m, offsets)):
                step.addcmul_(affinity[p], neighbour)
            m = step
        refined[own] = m
    return refined

"""The prediction rule, one function per step: from the model's map to a mask at the image's size.

    M = sum_k w_k A_k on the token grid (h, w)                        combine_slot_maps
    -> bilinear upsampling to the mask's (H, W), half-pixel centres   sample_positions, upsample_group
    -> min-max normalisation, then > threshold (0.5)                  cut_levels, threshold_maps
    = predict_masks (dense bool masks, for predict and overlays)

With `refine_iterations` > 0 the model adds one step before these (ShatterAndGather.infer): the map is
upsampled to the input size with `upsample_group`, normalised and refined along the image's edges
(sgmodel/refine.py); the steps above then take that map instead of the token-grid one.

and its run-length form for the metrics, `predicted_runs`: the same rule as sorted on/off edges down
each pixel column, never H x W pixels. Bilinear upsampling is separable: interpolating the (h, w) grid
along x to every pixel column gives h "knots" per column, and the column's response along y is the
piecewise-linear curve through them (flat before the first knot and after the last). It crosses the
cut only between two knots on opposite sides of it, at a point found in closed form and turned into a
pixel row, so a phrase costs h x W comparisons, and columns between two grid columns that are below
the cut everywhere are skipped altogether. Its min, max and first argmax come from a small subgrid:
rows sharing a pair of source rows ("pieces") see a response linear in the row index, likewise
columns, so a bilinear map takes its extremes at its pieces' first and last pixels (see `Axis`).

Float rounding: a pixel whose response equals the cut to within float precision (float32 for the
knots, as the maps come from the model) may land on either side in the two forms; every other pixel
is the same. Both forms batch the maps that share an output size, so Python loops run over sizes only.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import NamedTuple

import numpy as np
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


# ---- step 1: upsampling ----------------------------------------------------------------------------


def sample_positions(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each of `out_size` outputs samples a line of `in_size` values: low, high (out,) int64, frac (out,).

    Output i sits at source coordinate (i + 0.5) * in/out - 0.5 (half-pixel centres, align_corners=False),
    clamped at 0; it takes (1 - frac) of value `low` and frac of value `high` (clamped at in_size - 1).
    The same positions and edge clamping as F.interpolate(mode="bilinear") and image resizing.
    """
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)  # (out,)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # (out,)
    return low, np.minimum(low + 1, in_size - 1), src - low


def _interpolation_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) float weights of 1-D linear interpolation at `sample_positions`."""
    low, high, frac = sample_positions(out_size, in_size)
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), low), 1 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return torch.from_numpy(weights).float()


def upsample_group(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """maps (G, h, w) -> (G, H, W) float, bilinear at `sample_positions`.

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


# ---- steps 2 and 3: min-max normalisation and threshold ------------------------------------------


def cut_levels(low, high, threshold: float):
    """The response level above which a map with extremes (low, high) predicts the mask.

    (x - min) / (max - min) > t  is  x > min + t·(max - min): the normalised map is never built and
    nothing is divided, which matters at the original mask resolution (millions of pixels per phrase).
    A flat map (max = min) cuts at its own value, so it predicts nothing (no NaN).
    Works elementwise on tensors and arrays alike.
    """
    return low + threshold * (high - low)


def threshold_maps(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(G, H, W) upsampled maps -> bool (G, H, W): each map > its `cut_levels`."""
    flat = maps.float().flatten(1)  # (G, H*W)
    low, high = torch.aminmax(flat, dim=1, keepdim=True)  # (G, 1) each
    return (flat > cut_levels(low, high, threshold)).view(maps.shape)


def predict_masks(maps: torch.Tensor, sizes: list[Size], threshold: float = 0.5) -> list[torch.Tensor]:
    """Token-grid maps (T, h, w) -> one bool mask per map at its size (upsample, normalise, threshold)."""
    out: list[torch.Tensor | None] = [None] * len(sizes)
    for size, idx in group_by_size(sizes).items():
        for i, mask in zip(idx, threshold_maps(upsample_group(maps[idx], size), threshold)):
            out[i] = mask
    return out  # type: ignore[return-value]


# ---- the run-length form ---------------------------------------------------------------------------


class Axis(NamedTuple):
    """One axis of the bilinear upsampling out_size <- in_size at `sample_positions`, for the run-length form."""

    low: np.ndarray  # (out,) int64 lower source index
    high: np.ndarray  # (out,) int64 upper source index (clamped at in_size - 1)
    frac: np.ndarray  # (out,) float64 weight of `high`
    frac32: np.ndarray  # (out, 1) the same in float32, for the knots (see `predicted_runs`)
    corners: np.ndarray  # (S,) sorted outputs that are the first or last of a piece (a run sharing `low`)
    first: np.ndarray  # (in,) first output of each source index's piece
    repeats: np.ndarray  # (in,) outputs in it (0 for a source index no output starts from)
    scale: float  # out_size / in_size: source coordinate s lies at output (s + 0.5) * scale - 0.5


@lru_cache(maxsize=256)
def upsampling_axis(out_size: int, in_size: int) -> Axis:
    """`sample_positions` with what the run-length form needs besides.

    Outputs sharing `low` form a "piece" on which the response is linear in the output index, so a
    bilinear map's extremes lie at its pieces' first and last outputs (`corners`). Cached: evaluation
    meets few distinct image sizes.
    """
    low, high, frac = sample_positions(out_size, in_size)  # (out,) each
    piece_start = np.flatnonzero(np.diff(low, prepend=-1))  # (P,)
    corners = np.unique(np.concatenate([piece_start, np.append(piece_start[1:], out_size) - 1]))  # (S,)
    arrays = (low, high, frac, frac.astype(np.float32)[:, None], corners,
              np.searchsorted(low, np.arange(in_size)), np.bincount(low, minlength=in_size))
    for array in arrays:
        array.flags.writeable = False  # shared through the cache
    return Axis(*arrays, out_size / in_size)


def _lerp(values: np.ndarray, axis: Axis, outputs: np.ndarray | slice, dim: int) -> np.ndarray:
    """values interpolated along dimension `dim` at the given outputs of `axis`.

    Written as a + f * (b - a), not (1 - f) * a + f * b: equal neighbours give exactly their value, so a
    flat stretch of the map stays exactly flat and its first pixel is its first argmax.
    """
    a = np.take(values, axis.low[outputs], axis=dim)
    b = np.take(values, axis.high[outputs], axis=dim)
    frac = axis.frac[outputs].reshape((-1,) + (1,) * (values.ndim - 1 - dim % values.ndim))
    return a + frac * (b - a)


def _expand(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranges [first[i], first[i] + count[i]) laid end to end -> (values, index i of each value)."""
    which = np.repeat(np.arange(first.size), count)  # (N,)
    return np.arange(which.size) - (np.cumsum(count) - count - first)[which], which  # (N,), (N,)


def predicted_runs(grids: np.ndarray, height: int, width: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """grids (G, h, w) float64, one output size -> (edges (2N,), peak (G,)), positions of the G maps laid end to end.

    edges[0::2] start and edges[1::2] end (exclusive) the predicted runs, sorted, at column-major
    positions g * H * W + x * H + y: the pixels `predict_masks` sets, as runs (see the module docstring).
    peak: each map's first row-major argmax pixel, at the same kind of position.
    """
    count, h, w = grids.shape
    rows, cols = upsampling_axis(height, h), upsampling_axis(width, w)
    corners = _lerp(_lerp(grids, rows, rows.corners, dim=1), cols, cols.corners, dim=2)  # (G, Sr, Sc) where extremes lie
    corners = corners.reshape(count, -1)  # (G, Sr*Sc) row-major over sorted rows and columns
    peak = np.argmax(corners, axis=1)  # (G,) the image's first argmax (see the module docstring)
    peak = cols.corners[peak % cols.corners.size] * height + rows.corners[peak // cols.corners.size]  # (G,) x * H + y
    peak += np.arange(count) * (height * width)
    low, high = corners.min(axis=1), corners.max(axis=1)  # (G,)
    cut = cut_levels(low, high, threshold)  # (G,)

    # knots: the grid minus the cut at every pixel column, between two zero sentinel rows (off before the
    # first and after the last knot). Pixel columns sharing a source column l ("its piece") differ only in
    # frac, so the rows of the small (G, w, h+2) arrays are repeated rather than gathered, and a piece
    # whose two source columns are off everywhere is left out: nothing in it is predicted. float32 (as the
    # maps come): the knots are the bulk of the work, and a knot within float32 rounding of the cut is a
    # pixel at the cut.
    level = np.zeros((count, w, h + 2), dtype=np.float32)  # (G, w, h+2)
    level[:, :, 1:-1] = grids.transpose(0, 2, 1) - cut[:, None, None]
    level[~(high > low), :, 1:-1] = -1.0  # a flat map predicts nothing
    slope = np.zeros((count, w, h + 2), dtype=np.float32)  # (G, w, h+2) change towards the next source column (0 at the last)
    np.subtract(level[:, 1:], level[:, :-1], out=slope[:, :-1])
    peak_level = level.max(axis=2)  # (G, w) per source column
    reach = np.maximum(peak_level, peak_level[:, np.minimum(np.arange(1, w + 1), w - 1)])  # (G, w) per piece
    live = np.flatnonzero((reach > 0) & (cols.repeats > 0))  # (L,) g * w + l of the pieces to work on
    piece = live % w  # (L,)
    x, which = _expand(cols.first[piece], cols.repeats[piece])  # (C,) pixel column of each knot column, its piece
    column = (live // w)[which] * width + x  # (C,) g * W + x, increasing
    knots = np.repeat(slope.reshape(-1, h + 2)[live], cols.repeats[piece], axis=0)  # (C, h+2)
    knots *= cols.frac32[x]
    knots += np.repeat(level.reshape(-1, h + 2)[live], cols.repeats[piece], axis=0)
    above = (knots > 0).reshape(-1)  # (C*(h+2),) columns end to end; each begins and ends off
    flips = np.flatnonzero(above[1:] != above[:-1])  # (2N,) on, off, on, off, ... down each column in turn
    knot_column, knot = np.divmod(flips, h + 2)  # (2N,) each: the flip lies between padded knots knot, knot+1
    flat = knots.reshape(-1)
    before, after = flat[flips], flat[flips + 1]  # (2N,) each, on opposite sides of 0, so never equal
    # the crossing in source rows is knot - 1 + t (sentinels: t = 0 at the top, 1 at the bottom), in output rows:
    pixel = (knot - 0.5 + before / (before - after)) * rows.scale - 0.5  # (2N,)
    row = np.empty_like(pixel)
    np.floor(pixel[0::2], out=row[0::2])  # switching on: the first row past the crossing
    row[0::2] += 1
    np.ceil(pixel[1::2], out=row[1::2])  # switching off: the first row not before it
    np.clip(row, 0, height, out=row)
    return column[knot_column] * height + row.astype(np.int64), peak

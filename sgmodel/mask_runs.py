"""Masks as runs, and scoring response maps against them without any per-pixel array.

Why: scoring at the original mask resolution pixel by pixel (upsample a 24x24 map to e.g. 640x480,
threshold, compare with a decoded mask) costs as much as the per-sample numpy loop it is meant to
beat. Both sides of the comparison are far smaller in another form:

- the ground truth as the shards store it, COCO run-length encoding: a few hundred foreground runs of
  flattened column-major positions (pos = x * H + y), decoded here without a dense mask;
- the prediction: bilinear upsampling (half-pixel centres, clamped; sgmodel.inference) is separable.
  Interpolating the (h, w) grid along x to every pixel column gives h "knots" per column, and the
  column's response along y is the piecewise-linear curve through them (in the source coordinate,
  flat before the first knot and after the last). It crosses the cut only between two knots on
  opposite sides of it, at a point found in closed form and turned into a pixel row. So the
  prediction is a sorted list of on/off edges per column from h x W comparisons, not H x W pixels,
  and columns between two grid columns that are below the cut everywhere are skipped altogether.
- min, max and the first argmax of the upsampled map: rows sharing a pair of source rows ("pieces")
  see a response linear in the row index, likewise columns, so a bilinear map takes its extremes at
  its pieces' first and last pixels: a <= 2h x 2w subgrid holds them, and (a flat stretch being
  exactly flat, see `_lerp`) its first argmax in row-major order is the image's first argmax.

Intersections then come from the prediction's cumulative coverage at the mask's run ends
(`covered_before`), and phrases that share a mask size are handled as one array.

Float rounding: a pixel whose response equals the cut to within float precision (float32 for the
knots, as the maps come from the model) may land on either side compared with a per-pixel
computation (which itself depends on its float order there); every other pixel is counted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

import numpy as np

from sgdata.format import SegmentationError, decode_counts_together, rle_to_mask
from sgmodel.inference import group_by_size

# Knots (phrase x pixel column x grid row) scored in one array: bounds the scratch memory (~16 bytes each).
CHUNK_KNOTS = 1 << 19


@dataclass(frozen=True)
class MaskRuns:
    """A binary (height, width) mask as its foreground runs: [starts[i], ends[i]) of column-major positions.

    Runs are sorted, disjoint and non-empty. `shape` mirrors a dense mask's, so callers that only need
    the size (e.g. to upsample a prediction for an overlay) need not decode anything.
    """

    starts: np.ndarray  # (R,) int64
    ends: np.ndarray  # (R,) int64
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @cached_property
    def area(self) -> int:
        return int((self.ends - self.starts).sum())


# ---- decoding ---------------------------------------------------------------------------------------


def runs_from_lengths(lengths: np.ndarray, height: int, width: int) -> MaskRuns:
    """Alternating background/foreground run lengths (starting with background) -> MaskRuns."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise SegmentationError("RLE counts must not be negative")
    bounds = np.cumsum(lengths)  # (L,) end of each run
    total = int(bounds[-1]) if bounds.size else 0
    if total != height * width:
        raise SegmentationError(f"RLE counts sum to {total}, not height * width = {height * width}")
    ends = bounds[1::2]  # (R,) foreground runs are the odd ones
    starts = bounds[0 : 2 * ends.size : 2]  # (R,)
    keep = ends > starts  # zero-length runs (e.g. the first, when the mask starts with foreground) carry nothing
    return MaskRuns(starts[keep], ends[keep], int(height), int(width))


def _size(rle: dict) -> tuple[int, int]:
    return int(rle["size"][0]), int(rle["size"][1])


def _runs_from_compressed(rles: list[dict]) -> list[MaskRuns]:
    """Compressed RLEs -> MaskRuns, decoded, checked and cut into runs as one array."""
    lengths, string, index = decode_counts_together([rle["counts"] for rle in rles])  # (L,) each
    sizes = [_size(rle) for rle in rles]
    if lengths.size and lengths.min() < 0:
        raise SegmentationError("RLE counts must not be negative")
    totals = np.bincount(string, weights=lengths, minlength=len(rles))  # (K,) exact: far below 2**53
    expected = np.array([h * w for h, w in sizes])  # (K,)
    wrong = np.flatnonzero(totals != expected)
    if wrong.size:
        k = wrong[0]
        raise SegmentationError(f"RLE counts sum to {int(totals[k])}, not height * width = {expected[k]}")
    bounds = np.cumsum(lengths) - (np.cumsum(expected) - expected)[string]  # (L,) end of each run within its mask
    foreground = (index % 2 == 1) & (lengths > 0)  # (L,) odd runs; zero-length ones carry nothing
    ends = bounds[foreground]  # (R,)
    starts = ends - lengths[foreground]  # (R,)
    cuts = np.cumsum(np.bincount(string[foreground], minlength=len(rles)))[:-1]  # (K-1,)
    return [MaskRuns(s, e, h, w) for s, e, (h, w) in zip(np.split(starts, cuts), np.split(ends, cuts), sizes)]


def runs_from_rles(rles: list[dict]) -> list[MaskRuns]:
    """RLEs as the shards store them ({"size": [H, W], "counts": str}) -> MaskRuns, no dense mask.

    Compressed strings are decoded together; uncompressed counts (lists, as COCO's crowd annotations
    come) are taken as they are.
    """
    out: list[MaskRuns | None] = [None] * len(rles)
    compressed = [i for i, rle in enumerate(rles) if not isinstance(rle["counts"], list)]
    for i, runs in zip(compressed, _runs_from_compressed([rles[i] for i in compressed]) if compressed else []):
        out[i] = runs
    return [runs if runs is not None else runs_from_lengths(rle["counts"], *_size(rle)) for runs, rle in zip(out, rles)]


def runs_from_rle(rle: dict) -> MaskRuns:
    """One RLE dict -> MaskRuns (see `runs_from_rles`)."""
    return runs_from_rles([rle])[0]


def runs_from_dense(mask: Any) -> MaskRuns:
    """A dense (H, W) mask (bool / 0-1, numpy or torch) -> MaskRuns; for callers that hold dense masks."""
    if hasattr(mask, "detach"):  # a torch tensor: ne(0) gives canonical 0/1 even for bools stored as 255
        mask = mask.detach().ne(0).cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.view(np.uint8)  # a bool buffer may hold 255 for True: compare bytes, not bool values
    column_major = (mask.T.reshape(-1) != 0).view(np.int8)  # (H*W,) pos = x * H + y
    changes = np.flatnonzero(np.diff(column_major, prepend=0, append=0))  # alternating starts and ends
    return MaskRuns(changes[0::2].astype(np.int64), changes[1::2].astype(np.int64), mask.shape[0], mask.shape[1])


def as_runs_list(masks: list[Any]) -> list[MaskRuns]:
    """MaskRuns from what callers hand over, each a MaskRuns, an RLE dict or a dense (H, W) mask.

    RLEs are decoded together, and a mask repeated in the list (a referring expression's sentences
    share their object's mask) is decoded once.
    """
    out: list[MaskRuns | None] = [None] * len(masks)
    distinct: dict[tuple, int] = {}
    rles: list[dict] = []
    where: list[int] = []  # for each entry of `masks` that is an RLE: its index in `rles`
    for i, mask in enumerate(masks):
        if isinstance(mask, MaskRuns):
            out[i] = mask
        elif isinstance(mask, dict):
            counts = mask["counts"]
            key = (_size(mask), tuple(counts) if isinstance(counts, list) else counts)
            if key not in distinct:
                distinct[key] = len(rles)
                rles.append(mask)
            where.append(distinct[key])
        else:
            out[i] = runs_from_dense(mask)
    distinct_runs = runs_from_rles(rles) if rles else []
    decoded = iter([distinct_runs[j] for j in where])
    return [runs if runs is not None else next(decoded) for runs in out]


def dense_mask(mask: Any) -> np.ndarray:
    """Any mask form `as_runs_list` takes -> bool (H, W), for the few places that need pixels (overlays,
    per-pixel baselines). RLE dicts go through pycocotools, as everywhere else in the project."""
    if isinstance(mask, dict):
        return rle_to_mask(mask)
    if isinstance(mask, MaskRuns):
        steps = np.zeros(mask.height * mask.width + 1, dtype=np.int8)  # (H*W+1,) +1 at each start, -1 at each end
        steps[mask.starts] = 1
        steps[mask.ends] -= 1
        return np.cumsum(steps[:-1], dtype=np.int8).reshape(mask.width, mask.height).T.astype(bool)  # (H, W)
    if hasattr(mask, "detach"):
        return mask.detach().ne(0).cpu().numpy()
    mask = np.asarray(mask)
    return (mask.view(np.uint8) if mask.dtype == bool else mask) != 0  # bytes: a bool buffer may hold 255


def covered_before(starts: np.ndarray, ends: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For sorted disjoint intervals [starts, ends): how many covered positions lie below each p.

    The overlap of [a, b) with the intervals is F(b) - F(a). Used both ways: the mask's runs at the
    prediction's ends, and the prediction's runs at the mask's ends.
    """
    lengths = np.append(0, np.cumsum(ends - starts))  # (R+1,) covered before interval i
    previous_end = np.append(0, ends)  # (R+1,) end of the last interval starting at or before p
    count = np.searchsorted(starts, positions, side="right")  # (N,) intervals starting at or before p
    return lengths[count] - np.maximum(previous_end[count] - positions, 0)  # (N,)


# ---- upsampling geometry ------------------------------------------------------------------------


class Axis(NamedTuple):
    """One axis of the bilinear upsampling out_size <- in_size (sgmodel.inference's sample positions)."""

    low: np.ndarray  # (out,) int64 lower source index
    high: np.ndarray  # (out,) int64 upper source index (clamped at in_size - 1)
    frac: np.ndarray  # (out,) float64 weight of `high`
    frac32: np.ndarray  # (out, 1) the same in float32, for the knots (see `_prediction_edges`)
    corners: np.ndarray  # (S,) sorted outputs that are the first or last of a piece (a run sharing `low`)
    first: np.ndarray  # (in,) first output of each source index's piece
    repeats: np.ndarray  # (in,) outputs in it (0 for a source index no output starts from)
    scale: float  # out_size / in_size: source coordinate s lies at output (s + 0.5) * scale - 0.5


@lru_cache(maxsize=256)
def upsampling_axis(out_size: int, in_size: int) -> Axis:
    """Sample positions of sgmodel.inference._interpolation_matrix (half-pixel centres, clamped).

    Outputs sharing `low` form a "piece" on which the response is linear in the output index, so a
    bilinear map's extremes lie at its pieces' first and last outputs (`corners`). Cached: evaluation
    meets few distinct image sizes.
    """
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)  # (out,)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # (out,)
    high = np.minimum(low + 1, in_size - 1)  # (out,)
    piece_start = np.flatnonzero(np.diff(low, prepend=-1))  # (P,)
    corners = np.unique(np.concatenate([piece_start, np.append(piece_start[1:], out_size) - 1]))  # (S,)
    arrays = (low, high, src - low, (src - low).astype(np.float32)[:, None], corners,
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


# ---- scoring ------------------------------------------------------------------------------------


def _prediction_edges(grids: np.ndarray, height: int, width: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """grids (G, h, w) float64, one output size -> (edges (2N,), peak (G,)), positions of the G maps laid end to end.

    edges[0::2] start and edges[1::2] end (exclusive) the predicted runs, sorted, at column-major
    positions g * H * W + x * H + y; predicted = response > min + threshold * (max - min) (a flat map
    predicts nothing). peak: each map's first row-major argmax pixel, at the same kind of position.
    """
    count, h, w = grids.shape
    rows, cols = upsampling_axis(height, h), upsampling_axis(width, w)
    corners = _lerp(_lerp(grids, rows, rows.corners, dim=1), cols, cols.corners, dim=2)  # (G, Sr, Sc) where extremes lie
    corners = corners.reshape(count, -1)  # (G, Sr*Sc) row-major over sorted rows and columns
    peak = np.argmax(corners, axis=1)  # (G,) the image's first argmax (see the module docstring)
    peak = cols.corners[peak % cols.corners.size] * height + rows.corners[peak // cols.corners.size]  # (G,) x * H + y
    peak += np.arange(count) * (height * width)
    low, high = corners.min(axis=1), corners.max(axis=1)  # (G,)
    cut = low + threshold * (high - low)  # (G,)

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


def _score_same_size(grids: np.ndarray, runs: list[MaskRuns], threshold: float):
    """grids (G, h, w) float64 against G masks of one size (H, W) -> intersection, union (G,) int64, hit (G,) bool."""
    count = grids.shape[0]
    height, width = runs[0].shape
    area = height * width
    edges, peak = _prediction_edges(grids, height, width, threshold)
    on, off = edges[0::2], edges[1::2]  # (N,) each
    offsets = np.arange(count + 1) * area  # (G+1,) where each phrase's positions begin
    run_counts = np.array([r.starts.size for r in runs])  # (G,)
    truth_starts = np.concatenate([r.starts for r in runs]) + np.repeat(offsets[:-1], run_counts)  # (R,)
    truth_ends = np.concatenate([r.ends for r in runs]) + np.repeat(offsets[:-1], run_counts)  # (R,)
    # the prediction's coverage at the mask's run ends (a few hundred) rather than the other way round
    total = truth_starts.size
    covered = covered_before(on, off, np.concatenate([truth_starts, truth_ends, offsets]))  # (2R+G+1,)
    overlap = np.append(0, np.cumsum(covered[total : 2 * total] - covered[:total]))  # (R+1,) per run, accumulated
    bounds = np.append(0, np.cumsum(run_counts))  # (G+1,) each phrase's runs
    intersection = overlap[bounds[1:]] - overlap[bounds[:-1]]  # (G,)
    predicted = np.diff(covered[2 * total :])  # (G,) predicted pixels of each phrase
    truth_area = np.array([r.area for r in runs], dtype=np.int64)  # (G,)
    inside = covered_before(truth_starts, truth_ends, np.concatenate([peak, peak + 1]))  # (2G,)
    return intersection, predicted + truth_area - intersection, inside[count:] > inside[:count]


def score_maps(grids: Any, runs: list[MaskRuns], threshold: float = 0.5):
    """Response maps (T, h, w) against T masks, each at its mask's size -> intersection, union (T,) int64, hit (T,) bool.

    Per phrase: upsample bilinearly to the mask's (H, W), predict response > min + threshold * (max - min)
    (inference.threshold_maps' rule; a flat map predicts nothing); hit = the first row-major argmax
    pixel lies in the mask (PointM). Phrases sharing a mask size are scored as one array, in chunks
    of CHUNK_KNOTS knots (their scratch arrays stay small enough to be reused rather than mapped anew).
    """
    grids = np.asarray(grids, dtype=np.float64)  # (T, h, w)
    if grids.ndim != 3 or len(runs) != grids.shape[0]:
        raise ValueError(f"{grids.shape} response maps do not pair with {len(runs)} masks")
    intersection = np.zeros(len(runs), dtype=np.int64)
    union = np.zeros(len(runs), dtype=np.int64)
    hit = np.zeros(len(runs), dtype=bool)
    for (height, width), members in group_by_size([r.shape for r in runs]).items():
        step = max(1, CHUNK_KNOTS // (width * (grids.shape[1] + 2)))
        for begin in range(0, len(members), step):
            chunk = members[begin : begin + step]
            intersection[chunk], union[chunk], hit[chunk] = _score_same_size(grids[chunk], [runs[i] for i in chunk], threshold)
    return intersection, union, hit


def score_runs(grid: Any, runs: MaskRuns, threshold: float = 0.5) -> tuple[int, int, bool]:
    """(intersection, union, hit) of one response map grid (h, w) against one mask (see `score_maps`)."""
    intersection, union, hit = score_maps(np.asarray(grid)[None], [runs], threshold)
    return int(intersection[0]), int(union[0]), bool(hit[0])

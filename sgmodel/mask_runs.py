"""Masks as runs, and scoring response maps against them without any per-pixel array.

Why: scoring at the original mask resolution pixel by pixel (upsample a 24x24 map to e.g. 640x480,
threshold, compare with a decoded mask) costs as much as the per-sample numpy loop it is meant to
beat. Both sides of the comparison are far smaller as runs of flattened column-major positions
(pos = x * H + y):

- the ground truth as the shards store it, COCO run-length encoding: a few hundred foreground runs,
  decoded without a dense mask (sgdata.format.foreground_runs);
- the prediction: the prediction rule's run-length form, sgmodel.inference.predicted_runs.

Intersections then come from the prediction's cumulative coverage at the mask's run ends
(`covered_before`), and phrases that share a mask size are handled as one array. The counts equal a
per-pixel computation's but for pixels within float rounding of the cut (see sgmodel.inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from sgdata.format import foreground_runs
from sgmodel.inference import group_by_size, predicted_runs

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


def runs_from_rles(rles: list[dict]) -> list[MaskRuns]:
    """RLEs as the shards store them ({"size": [H, W], "counts": str}, or counts as a list of run lengths
    as COCO's crowd annotations come) -> MaskRuns, decoded together, no dense mask."""
    starts, ends, which = foreground_runs(rles)  # (R,) each
    cuts = np.cumsum(np.bincount(which, minlength=len(rles)))[:-1]  # (K-1,) first run of each later mask
    return [MaskRuns(s, e, int(rle["size"][0]), int(rle["size"][1]))
            for s, e, rle in zip(np.split(starts, cuts), np.split(ends, cuts), rles)]


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
            key = (tuple(mask["size"]), tuple(counts) if isinstance(counts, list) else counts)
            if key not in distinct:
                distinct[key] = len(rles)
                rles.append(mask)
            where.append(distinct[key])
        else:
            out[i] = runs_from_dense(mask)
    distinct_runs = runs_from_rles(rles) if rles else []
    decoded = iter([distinct_runs[j] for j in where])
    return [runs if runs is not None else next(decoded) for runs in out]


def covered_before(starts: np.ndarray, ends: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For sorted disjoint intervals [starts, ends): how many covered positions lie below each p.

    The overlap of [a, b) with the intervals is F(b) - F(a). Used both ways: the mask's runs at the
    prediction's ends, and the prediction's runs at the mask's ends.
    """
    lengths = np.append(0, np.cumsum(ends - starts))  # (R+1,) covered before interval i
    previous_end = np.append(0, ends)  # (R+1,) end of the last interval starting at or before p
    count = np.searchsorted(starts, positions, side="right")  # (N,) intervals starting at or before p
    return lengths[count] - np.maximum(previous_end[count] - positions, 0)  # (N,)


# ---- scoring ------------------------------------------------------------------------------------


def _score_same_size(grids: np.ndarray, runs: list[MaskRuns], threshold: float):
    """grids (G, h, w) float64 against G masks of one size (H, W) -> intersection, union (G,) int64, hit (G,) bool."""
    count = grids.shape[0]
    height, width = runs[0].shape
    area = height * width
    edges, peak = predicted_runs(grids, height, width, threshold)
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
    (sgmodel.inference's rule; a flat map predicts nothing); hit = the first row-major argmax
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

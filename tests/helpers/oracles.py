"""Slow, plainly written reference versions of library rules, for tests to compare the fast ones with.

Not a test module: tests import these as oracles. Each one follows its rule's definition step by step
(one character at a time where that is the clearest), with no code shared with the library.
"""

from __future__ import annotations

import numpy as np

from sgdata.format import SegmentationError


def decode_counts_string(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO counts string, one character at a time as pycocotools'
    `rleFrString` reads it: little-endian 5-bit groups (character 48 + value), 0x20 = more groups
    follow, 0x10 in the last group = negative, from the fourth run on a difference to the run two
    places before. Raises SegmentationError at the first fault met in reading order."""
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            raise SegmentationError("compressed RLE counts are not ASCII text") from None
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        group = ord(char) - 48
        if not 0 <= group < 64:
            raise SegmentationError(f"compressed RLE counts hold {char!r}, which is not a run-length character")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            if shift >= 60:  # pycocotools reads each run into a 64-bit integer: at most 12 groups
                raise SegmentationError("compressed RLE counts hold a run that does not fit 64 bits")
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise SegmentationError("compressed RLE counts end in the middle of a run")
    return runs


def _source_positions(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel centres mapped back to the source, clamped: lower index, upper index, weight of the upper."""
    source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    return lower, np.minimum(lower + 1, in_size - 1), source - lower


def bilinear_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width) float64, bilinear with half-pixel centres, source coordinates clamped
    at the borders (what image resizing and F.interpolate(align_corners=False) do)."""
    grid = np.asarray(grid, dtype=np.float64)
    y0, y1, fy = _source_positions(height, grid.shape[0])
    x0, x1, fx = _source_positions(width, grid.shape[1])
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx  # (height, width) along the upper source row
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def predicted_mask(response: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The prediction rule on an upsampled response: min-max normalise to [0, 1], then > threshold;
    a flat response (max = min) predicts nothing."""
    low, high = response.min(), response.max()
    if high <= low:
        return np.zeros(response.shape, dtype=bool)
    return (response - low) / (high - low) > threshold


def per_pixel_scores(grid: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> tuple[int, int, bool]:
    """(intersection, union, hit) of one response grid (h, w) against a dense mask (H, W): upsample, predict,
    count, and hit = the first row-major argmax pixel of the upsampled response lies in the mask."""
    response = bilinear_upsample(grid, *mask.shape)
    predicted = predicted_mask(response, threshold)
    hit = bool(mask.flat[int(np.argmax(response))])
    return int((predicted & mask).sum()), int((predicted | mask).sum()), hit


def dense_from_runs(starts: np.ndarray, ends: np.ndarray, height: int, width: int) -> np.ndarray:
    """Foreground runs [starts, ends) of column-major positions (x * H + y) -> bool mask (H, W)."""
    flat = np.zeros(height * width, dtype=bool)  # column-major
    for start, end in zip(starts.tolist(), ends.tolist()):
        flat[start:end] = True
    return flat.reshape(width, height).T

"""COCO run-length-encoded masks: the one mask format of the shards, the evaluator and the tools.

Everything goes through pycocotools so a mask written here decodes identically wherever the
COCO tools are used. An RLE here is always the *compressed* form as JSON carries it:
`{"size": [height, width], "counts": str}`. pycocotools trusts its input (no bounds checks in C),
so what it would crash on or store broken is checked here first: RLE counts must describe exactly
one mask of the image's size, and polygons far off the image are clipped before rasterising.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


# pycocotools draws a polygon's outline at 5x resolution, one int pair per step (plus as much again to
# fill it): outlines longer than this many steps are refused rather than allocated (about 270 MB).
MAX_OUTLINE_STEPS = 1 << 24


class SegmentationError(ValueError):
    """A segmentation that yields no mask (no polygon part with 3 points, malformed RLE)."""


def clean_polygons(seg: Any) -> list[list[float]]:
    """The polygon parts that describe an area: at least 3 finite points each.

    Parts with fewer points are dropped because pycocotools reads a 4-number list as a box,
    not a polygon, and 1-2 points enclose nothing. An odd trailing coordinate is ignored.
    """
    if not isinstance(seg, (list, tuple)):
        return []
    parts = []
    for part in seg:
        if not isinstance(part, (list, tuple)):
            continue
        try:
            coords = [float(v) for v in part[: len(part) - len(part) % 2]]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
            continue
        if len(coords) >= 6 and all(math.isfinite(v) for v in coords):
            parts.append(coords)
    return parts


def _compressed(rle: dict) -> dict:
    """pycocotools' RLE (counts as bytes) -> the JSON form (counts as str, size as a list)."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _for_pycocotools(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def decode_counts_string(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO counts string, read exactly as pycocotools' `rleFrString` reads it.

    Each run is a little-endian sequence of 5-bit groups, one character (48 + value) per group,
    0x20 meaning "more groups follow" and 0x10 in the last group the sign; from the fourth run on,
    a run is stored as the difference to the run two places before. Read here in Python because
    pycocotools' decoder does no bounds checks: counts that do not add up to the mask's size
    would be written past its buffer. Raises SegmentationError for text that is not such a string.
    """
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


def _check_runs(runs: list, height: int, width: int) -> None:
    """Run lengths that describe exactly one (height x width) mask: whole, non-negative, summing to its area."""
    if not all(isinstance(run, numbers.Integral) and not isinstance(run, bool) for run in runs):
        raise SegmentationError("RLE counts must be whole numbers")
    if any(run < 0 for run in runs):
        raise SegmentationError("RLE counts must not be negative")
    if sum(runs) != height * width:
        raise SegmentationError(f"RLE counts sum to {sum(runs)}, not height * width = {height * width}")


def check_rle(seg: dict, height: int, width: int) -> None:
    """Raise SegmentationError unless `seg` is an RLE (compressed or not) of exactly one (height x width) mask.

    Cheap (no mask is decoded), so planning can check every RLE before any worker stores one.
    """
    if "counts" not in seg or "size" not in seg:
        raise SegmentationError("RLE segmentation lacks 'counts' or 'size'")
    try:
        size = [int(seg["size"][0]), int(seg["size"][1])]
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as exc:
        raise SegmentationError(f"RLE segmentation has a malformed size {repr(seg['size'])[:40]}") from exc
    if size != [height, width]:
        raise SegmentationError(f"RLE segmentation size {size} differs from the image's {[height, width]}")
    counts = seg["counts"]
    if isinstance(counts, list):
        _check_runs(counts, height, width)
    elif isinstance(counts, (str, bytes)):
        _check_runs(decode_counts_string(counts), height, width)
    else:
        raise SegmentationError(f"RLE counts of type {type(counts).__name__} are not understood")


def _clip_polygon(coords: list[float], x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """The part of a polygon inside the box [x0, x1] x [y0, y1] (Sutherland-Hodgman), as a flat list.

    pycocotools' rasteriser walks every edge at 5x resolution, so its time and memory grow with
    the coordinates' size and far-away coordinates make it crash; inside the box, the clipped
    polygon covers the same region as the original.
    """
    points = list(zip(coords[0::2], coords[1::2]))
    edges = (
        (lambda p: p[0] >= x0, lambda p, q: (x0, p[1] + (q[1] - p[1]) * (x0 - p[0]) / (q[0] - p[0]))),
        (lambda p: p[0] <= x1, lambda p, q: (x1, p[1] + (q[1] - p[1]) * (x1 - p[0]) / (q[0] - p[0]))),
        (lambda p: p[1] >= y0, lambda p, q: (p[0] + (q[0] - p[0]) * (y0 - p[1]) / (q[1] - p[1]), y0)),
        (lambda p: p[1] <= y1, lambda p, q: (p[0] + (q[0] - p[0]) * (y1 - p[1]) / (q[1] - p[1]), y1)),
    )
    for inside, cross in edges:
        clipped = []
        for index, current in enumerate(points):
            previous = points[index - 1]
            if inside(current):
                if not inside(previous):
                    clipped.append(cross(previous, current))
                clipped.append(current)
            elif inside(previous):
                clipped.append(cross(previous, current))
        points = clipped
        if not points:
            break
    return [v for point in points for v in point]


def _outline_steps(part: list[float]) -> int:
    """How many points pycocotools' `rleFrPoly` allocates for this part's outline."""
    xs = [int(5 * v + 0.5) for v in part[0::2]]
    ys = [int(5 * v + 0.5) for v in part[1::2]]
    return sum(max(abs(xs[i] - xs[i - 1]), abs(ys[i] - ys[i - 1])) + 1 for i in range(len(xs)))


def _bounded_polygons(polygons: list[list[float]], height: int, width: int) -> list[list[float]]:
    """Parts reaching further than one image size beyond the image are clipped there (see `_clip_polygon`).

    Real annotations lie within a pixel of their image, so they are never clipped and rasterise
    exactly as in pycocotools; a clipped part covers the same region of the image, give or take the
    rounding of its new corners (a pixel along the edges that leave the margin).
    Raises SegmentationError when the outline is still too long to rasterise (`MAX_OUTLINE_STEPS`).
    """
    margin = float(max(height, width))
    x0, y0, x1, y1 = -margin, -margin, width + margin, height + margin
    bounded = []
    for part in polygons:
        xs, ys = part[0::2], part[1::2]
        if min(xs) < x0 or max(xs) > x1 or min(ys) < y0 or max(ys) > y1:
            part = _clip_polygon(part, x0, y0, x1, y1)
        if len(part) >= 6:
            bounded.append(part)
    if sum(_outline_steps(part) for part in bounded) > MAX_OUTLINE_STEPS:
        raise SegmentationError(f"the polygon's outline is longer than {MAX_OUTLINE_STEPS} steps to rasterise")
    return bounded


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict:
    """A COCO `segmentation` (polygon list, uncompressed or compressed RLE) -> compressed RLE.

    Polygon parts are rasterised separately and merged (union), exactly as pycocotools'
    `annToRLE` does, so masks match what every COCO-based evaluator decodes.
    Raises SegmentationError when nothing usable is left, and for an RLE whose counts do not
    describe exactly one mask of the image's size (so no undecodable mask is ever stored).
    """
    if isinstance(seg, dict):
        check_rle(seg, height, width)
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed (crowd annotations): column-major run lengths
            uncompressed = {"size": [height, width], "counts": [int(c) for c in counts]}
            return _compressed(mask_utils.frPyObjects(uncompressed, height, width))
        return _compressed({"size": [height, width], "counts": counts})
    polygons = clean_polygons(seg)
    if not polygons:
        raise SegmentationError("no polygon part has 3 or more points")
    polygons = _bounded_polygons(polygons, height, width)
    if not polygons:  # every part lies far outside the image: it covers none of it
        return mask_to_rle(np.zeros((height, width), dtype=bool))
    rles = mask_utils.frPyObjects(polygons, height, width)
    return _compressed(mask_utils.merge(rles))


def rle_to_mask(rle: dict) -> np.ndarray:
    """Compressed RLE -> bool mask (H, W)."""
    return mask_utils.decode(_for_pycocotools(rle)).astype(bool)  # (H, W)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Bool/0-1 mask (H, W) -> compressed RLE."""
    fortran = np.asfortranarray(np.asarray(mask, dtype=np.uint8))  # (H, W), column-major as RLE runs
    return _compressed(mask_utils.encode(fortran))


def _as_image(rle: dict) -> Image.Image:
    return Image.fromarray(rle_to_mask(rle).astype(np.uint8) * 255, mode="L")


def _from_image(image: Image.Image) -> dict:
    return mask_to_rle(np.asarray(image) > 127)


def resize_rle(rle: dict, height: int, width: int) -> dict:
    """Nearest-neighbour resize to (height, width): keeps the mask binary, as the image's resize is applied."""
    if [int(rle["size"][0]), int(rle["size"][1])] == [height, width]:
        return _compressed(rle)
    return _from_image(_as_image(rle).resize((width, height), Image.Resampling.NEAREST))


def transpose_rle(rle: dict, transpose: int) -> dict:
    """Apply a PIL `Image.Transpose` operation (e.g. the image's EXIF orientation) to the mask."""
    return _from_image(_as_image(rle).transpose(Image.Transpose(transpose)))

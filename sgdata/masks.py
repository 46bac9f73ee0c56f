"""Masks as the build makes them: COCO segmentations to RLE, resized and turned with their image.

The RLE format itself (encode, decode, checks) is part of the data contract, `sgdata.format.rle`.
pycocotools trusts its input (no bounds checks in C), so what it would crash on or store broken is
checked first: RLE counts must describe exactly one mask of the image's size (`check_rle`), and
polygons far off the image are clipped before rasterising.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sgdata.format.errors import SegmentationError
from sgdata.format.rle import check_rle, compressed, foreground_runs, mask_to_rle, rle_to_mask


# pycocotools draws a polygon's outline at 5x resolution, one int pair per step (plus as much again to
# fill it): outlines longer than this many steps are refused rather than allocated (about 270 MB).
MAX_OUTLINE_STEPS = 1 << 24


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
    # Each step of an outline spans at most 5 x (the bounded box's longer side) + 1 pixels: only outlines
    # that could pass the limit by that bound are counted exactly (real ones never come near it).
    longest_step = 5 * (max(height, width) + 2 * margin) + 2
    could_be_long = sum(len(part) // 2 for part in bounded) * longest_step > MAX_OUTLINE_STEPS
    if could_be_long and sum(_outline_steps(part) for part in bounded) > MAX_OUTLINE_STEPS:
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
            return compressed(mask_utils.frPyObjects(uncompressed, height, width))
        return compressed({"size": [height, width], "counts": counts})
    polygons = clean_polygons(seg)
    if not polygons:
        raise SegmentationError("no polygon part has 3 or more points")
    polygons = _bounded_polygons(polygons, height, width)
    if not polygons:  # every part lies far outside the image: it covers none of it
        return mask_to_rle(np.zeros((height, width), dtype=bool))
    rles = mask_utils.frPyObjects(polygons, height, width)
    return compressed(mask_utils.merge(rles))


def _as_image(rle: dict) -> Image.Image:
    return Image.fromarray(rle_to_mask(rle).astype(np.uint8) * 255, mode="L")


def _from_image(image: Image.Image) -> dict:
    return mask_to_rle(np.asarray(image) > 127)


@functools.lru_cache(maxsize=256)
def nearest_indices(source: int, target: int) -> np.ndarray:
    """The source pixel each of `target` pixels takes under Pillow's NEAREST resize along one axis.

    Read off Pillow itself (a one-pixel-high image holding its own column numbers, resized), so masks
    follow exactly the pixel-centre rounding Pillow applies to the image, at every size.
    """
    numbers = Image.fromarray(np.arange(source, dtype=np.int32)[None, :], mode="I")  # (1, source)
    return np.asarray(numbers.resize((target, 1), Image.Resampling.NEAREST), dtype=np.int64)[0]  # (target,)


def _rles_from_runs(starts: np.ndarray, ends: np.ndarray, count: int, height: int, width: int) -> list[dict]:
    """Sorted, disjoint, non-empty runs of `count` masks laid end to end -> one compressed RLE per mask.

    The strings are the ones pycocotools encodes from the dense masks: touching runs are one run, and
    a mask ending on foreground has no empty last run.
    """
    area = height * width
    joined = np.flatnonzero((starts[1:] == ends[:-1]) & (starts[1:] % area != 0))  # touching, same mask
    starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    cuts = np.searchsorted(starts, np.arange(1, count) * area)  # (K-1,) first run of each later mask
    uncompressed = []
    for k, (mask_starts, mask_ends) in enumerate(zip(np.split(starts, cuts), np.split(ends, cuts))):
        edges = np.stack([mask_starts, mask_ends], axis=1).reshape(-1) - k * area  # (2R,) alternating run ends
        counts = np.diff(edges, prepend=0, append=area)  # (2R+1,) starts with a background run
        if counts.size > 1 and counts[-1] == 0:
            counts = counts[:-1]
        uncompressed.append({"size": [height, width], "counts": counts.tolist()})
    return [compressed(rle) for rle in mask_utils.frPyObjects(uncompressed, height, width)] if uncompressed else []


def resize_rles(rles: list[dict], height: int, width: int) -> list[dict]:
    """Nearest-neighbour resize of masks of one size to (height, width), as the image's resize is applied.

    The same pixels as resizing each mask image with Pillow's NEAREST (the axes are independent: target
    pixel (y, x) is source pixel (rows[y], cols[x])), computed on the runs without a dense mask: each
    run is cut at the column boundaries, and each piece of source column c becomes, in every target
    column taking c, the target rows whose source row lies inside it. All masks of an image go
    through as one array; this is the build's hot path for `--max-size` (every ref of every image),
    where it costs a tenth of a round trip through decoded Pillow images.
    """
    if not rles:
        return []
    source_height, source_width = int(rles[0]["size"][0]), int(rles[0]["size"][1])
    if any([int(r["size"][0]), int(r["size"][1])] != [source_height, source_width] for r in rles):
        raise ValueError("resize_rles takes masks of one size; resize the others in their own call")
    if (source_height, source_width) == (height, width):
        return [compressed(rle) for rle in rles]
    area = source_height * source_width
    starts, ends, which = foreground_runs(rles)  # (R,) each, positions within each mask
    # mask k's positions shifted by k * area: K masks of W columns read as one mask of K * W columns
    starts, ends = starts + which * area, ends + which * area
    first_column, last_column = starts // source_height, (ends - 1) // source_height  # (R,) over all masks
    pieces_per_run = last_column - first_column + 1  # (R,)
    run = np.repeat(np.arange(starts.size), pieces_per_run)  # (P,) the run each piece comes from
    column = first_column[run] + np.arange(run.size) - np.repeat(np.cumsum(pieces_per_run) - pieces_per_run,
                                                                 pieces_per_run)  # (P,) source column
    top = np.maximum(starts[run] - column * source_height, 0)  # (P,) first source row of the piece
    bottom = np.minimum(ends[run] - column * source_height, source_height)  # (P,) one past its last row
    rows, cols = nearest_indices(source_height, height), nearest_indices(source_width, width)  # (h,), (w,)
    target_top, target_bottom = np.searchsorted(rows, top), np.searchsorted(rows, bottom)  # (P,) each
    masks = np.arange(len(rles), dtype=np.int64)[:, None]  # (K, 1)
    wanted = (masks * source_width + cols[None, :]).reshape(-1)  # (K*w,) source column of each target column
    first_piece = np.searchsorted(column, wanted, side="left")  # (K*w,)
    count = np.searchsorted(column, wanted, side="right") - first_piece  # (K*w,) pieces in that source column
    piece = np.repeat(first_piece, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # (Q,)
    offset = np.repeat(np.arange(wanted.size, dtype=np.int64) * height, count)  # (Q,) target column * h
    new_starts, new_ends = offset + target_top[piece], offset + target_bottom[piece]  # (Q,) each
    kept = new_ends > new_starts  # pieces that fall between two sampled rows vanish
    return _rles_from_runs(new_starts[kept], new_ends[kept], len(rles), height, width)


def resize_rle(rle: dict, height: int, width: int) -> dict:
    """One mask's nearest-neighbour resize to (height, width) (see `resize_rles`)."""
    return resize_rles([rle], height, width)[0]


def transpose_rle(rle: dict, transpose: int) -> dict:
    """Apply a PIL `Image.Transpose` operation (e.g. the image's EXIF orientation) to the mask."""
    return _from_image(_as_image(rle).transpose(Image.Transpose(transpose)))

"""COCO run-length-encoded masks: the one mask format of the shards, the evaluator and the tools.

Everything goes through pycocotools so a mask written here decodes identically wherever the
COCO tools are used. An RLE here is always the *compressed* form as JSON carries it:
`{"size": [height, width], "counts": str}`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


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
        except (TypeError, ValueError):
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


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict:
    """A COCO `segmentation` (polygon list, uncompressed or compressed RLE) -> compressed RLE.

    Polygon parts are rasterised separately and merged (union), exactly as pycocotools'
    `annToRLE` does, so masks match what every COCO-based evaluator decodes.
    Raises SegmentationError when nothing usable is left.
    """
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise SegmentationError("RLE segmentation lacks 'counts' or 'size'")
        try:
            size = [int(seg["size"][0]), int(seg["size"][1])]
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise SegmentationError(f"RLE segmentation has a malformed size {seg['size']!r}") from exc
        if size != [height, width]:
            raise SegmentationError(f"RLE segmentation size {size} differs from the image's {[height, width]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed (crowd annotations): column-major run lengths
            if sum(int(c) for c in counts) != height * width:
                raise SegmentationError("uncompressed RLE counts do not sum to height * width")
            return _compressed(mask_utils.frPyObjects({"size": size, "counts": counts}, height, width))
        if isinstance(counts, (str, bytes)):
            return _compressed({"size": size, "counts": counts})
        raise SegmentationError(f"RLE counts of type {type(counts).__name__} are not understood")
    polygons = clean_polygons(seg)
    if not polygons:
        raise SegmentationError("no polygon part has 3 or more points")
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

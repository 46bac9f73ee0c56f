"""One RefCOCO-family sample: every usable ref of an image with its mask and box at the stored resolution.

`finalize` runs in the workers with the stored image in hand and produces the sample JSON, with
each mask and box carried through the same orientation and resize the image went through. Every
referring source (the refer toolkit files, the Hub parquet copies, PhraseCut) writes its samples here.
"""

from __future__ import annotations

import json

from sgdata.format.errors import SampleError, SegmentationError
from sgdata.images import oriented_size
from sgdata.masks import resize_rles, segmentation_to_rle, transpose_rle
from sgdata.sources.base import Failure, Finalized, StoredImage


def _transform_bbox(bbox: list[float], width: int, height: int, transpose: int | None,
                    out_width: int, out_height: int) -> list[float]:
    """An [x, y, w, h] box in the raw (width x height) frame -> the stored image's frame.

    Corners are mapped through the transpose (the same op the pixels got), then scaled.
    """
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
    corners = [(x0, y0), (x1, y1)]
    if transpose is not None:
        mapping = {
            0: lambda x, y: (width - x, y),  # FLIP_LEFT_RIGHT
            1: lambda x, y: (x, height - y),  # FLIP_TOP_BOTTOM
            2: lambda x, y: (y, width - x),  # ROTATE_90 (counter-clockwise)
            3: lambda x, y: (width - x, height - y),  # ROTATE_180
            4: lambda x, y: (height - y, x),  # ROTATE_270
            5: lambda x, y: (y, x),  # TRANSPOSE
            6: lambda x, y: (height - y, width - x),  # TRANSVERSE
        }[int(transpose)]
        corners = [mapping(x, y) for x, y in corners]
    upright_width, upright_height = oriented_size(width, height, transpose)
    sx, sy = out_width / upright_width, out_height / upright_height
    xs = [x * sx for x, _ in corners]
    ys = [y * sy for _, y in corners]
    return [float(min(xs)), float(min(ys)), float(max(xs) - min(xs)), float(max(ys) - min(ys))]


def dumps_sample(sample: dict) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, UTF-8 text kept as is."""
    return json.dumps(sample, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def finalize(record: dict, image: StoredImage) -> Finalized:
    """The sample JSON for one image: every usable ref with its mask and box at the stored resolution."""
    width, height = int(record["width"]), int(record["height"])
    if (image.source_width, image.source_height) != (width, height):
        raise SampleError("size_mismatch", f"{record.get('sizes_from', 'instances.json')} says {width}x{height} "
                          f"but the file is "
                          f"{image.source_width}x{image.source_height}; masks would not line up")
    upright = oriented_size(width, height, image.transpose)
    usable, rles, failures = [], [], []
    for entry in record["refs"]:
        try:
            rle = segmentation_to_rle(entry["segmentation"], height, width)
        except SegmentationError as exc:
            failures.append(Failure(path=f"{record.get('refs_file', '')}#ref_id={entry['ref_id']}",
                                    reason="malformed_segmentation", detail=str(exc), split=record["split"]))
            continue
        if image.transpose is not None:
            rle = transpose_rle(rle, image.transpose)
        usable.append(entry)
        rles.append(rle)
    if upright != (image.width, image.height):
        rles = resize_rles(rles, image.height, image.width)  # all of the image's masks in one pass
    refs, texts = [], []
    for entry, rle in zip(usable, rles):
        refs.append({
            "ref_id": entry["ref_id"],
            "ann_id": entry["ann_id"],
            "category_id": entry["category_id"],
            "category": entry["category"],
            "bbox": _transform_bbox(entry["bbox"], width, height, image.transpose, image.width, image.height),
            "sentences": [{"sent_id": s["sent_id"], "text": s["text"]} for s in entry["sentences"]],
            "mask": {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]},
        })
        texts.extend(s["text"] for s in entry["sentences"])
    if not refs:
        raise SampleError("no_usable_refs", f"image {record['image_id']}: no ref has a usable segmentation")
    sample = {
        "image_id": record["image_id"],
        "file_name": record["file_name"],
        "width": image.width,
        "height": image.height,
        "dataset": record["dataset"],
        "split": record["split"],
        "refs": refs,
    }
    return Finalized(files={"json": dumps_sample(sample)}, texts=texts, source_id=str(record["image_id"]),
                     failures=failures)

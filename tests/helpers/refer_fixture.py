"""A small refer-toolkit dataset written to disk, for the sgdata tests (importable by any test).

`make_refer_fixture(root)` writes `root/refer/<dataset>/instances.json`, `root/refer/<dataset>/refs(<splitBy>).p`
(pickle protocol 2, as the toolkit's files) and real JPEG images under `root/images`, and returns the paths
together with the source objects so a test can compare what a build produced against what went in.

What it covers: textured images of a few sizes, one stored with EXIF orientation 6 (raw pixels on
their side, annotations in that raw frame), one grayscale JPEG, one PNG saved under a .jpg name,
single and multi-part polygons, a crowd annotation as uncompressed RLE, several refs per image and per
annotation, a non-ASCII sentence, a sentence with only `raw`, and four splits. `faults` adds bad items
whose ref or image ids come back in `faults` of the result.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

FAULT_KINDS = (
    "missing_image",  # the file of one image is not on disk
    "missing_annotation",  # a ref names an annotation that instances.json lacks
    "degenerate_polygon",  # a ref whose annotation polygon has only 2 points (its image's other refs stay)
    "missing_image_record",  # a ref names an image_id that instances.json lacks
    "no_sentences",  # a ref with an empty sentence list
)

# (image_id, raw width, raw height, how it is stored, index of its split in `splits`)
_IMAGES = [
    (391895, 64, 48, "jpeg", 0),
    (522418, 48, 64, "jpeg", 0),
    (184613, 56, 40, "grayscale", 1),
    (318219, 40, 56, "exif6", 2),
    (554625, 60, 44, "png_as_jpg", 3),
    (574769, 52, 52, "jpeg", 3),
]
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 62, "name": "chair", "supercategory": "furniture"}]


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _texture(rng: np.random.Generator, width: int, height: int, grayscale: bool) -> np.ndarray:
    """Gradients plus noise: JPEG-compressible but not flat, so orientation mistakes are visible."""
    ys, xs = np.mgrid[0:height, 0:width]  # (H, W)
    channels = 1 if grayscale else 3
    base = np.stack([(xs * (3 + c) + ys * (5 - c)) % 256 for c in range(channels)], axis=-1)  # (H, W, C)
    noise = rng.integers(0, 40, size=base.shape)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return pixels[..., 0] if grayscale else pixels


def _polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, points: int) -> list[float]:
    """A star-shaped polygon (floats with decimals, as COCO's) around (cx, cy)."""
    coords = []
    for k in range(points):
        angle = 2 * math.pi * k / points
        r = radius * float(rng.uniform(0.6, 1.0))
        coords += [round(cx + r * math.cos(angle), 2), round(cy + r * math.sin(angle), 2)]
    return coords


def _polygon_bbox(parts: list[list[float]]) -> list[float]:
    xs = [v for part in parts for v in part[0::2]]
    ys = [v for part in parts for v in part[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros, as COCO crowd annotations store them."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def _save_image(path: Path, kind: str, pixels: np.ndarray) -> None:
    if kind == "grayscale":
        Image.fromarray(pixels, mode="L").save(path, format="JPEG", quality=90)
    elif kind == "png_as_jpg":
        Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
    elif kind == "exif6":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.fromarray(pixels, mode="RGB").save(path, format="JPEG", quality=90, exif=exif.tobytes())
    else:
        Image.fromarray(pixels, mode="RGB").save(path, format="JPEG", quality=90)


def make_refer_fixture(
    root: Path,
    *,
    dataset: str = "refcoco",
    split_by: str = "unc",
    splits: Iterable[str] = ("train", "val", "testA", "testB"),
    faults: Iterable[str] = (),
    seed: int = 0,
) -> dict:
    """Write the dataset under `root`; return paths, the instances dict, the refs list and fault ids."""
    faults = set(faults)
    unknown = faults - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
    splits = list(splits)
    rng = np.random.default_rng(seed)
    root = Path(root)
    refer_root, images_dir = root / "refer", root / "images"
    dataset_dir = refer_root / dataset
    dataset_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)

    images, annotations, refs, image_paths = [], [], [], {}
    next_ann, next_ref, next_sent = 1000, 0, 0

    def add_ref(ann_id: int, image_id: int, category_id: int, split: str, texts: list[str], *, raw_only: bool = False) -> int:
        nonlocal next_ref, next_sent
        ref_id, next_ref = next_ref, next_ref + 1
        sentences = []
        for text in texts:
            sentences.append({"sent_id": next_sent, "raw": text.upper() if not raw_only else text,
                              "sent": "" if raw_only else text, "tokens": text.split()})
            next_sent += 1
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                     "category_id": category_id, "file_name": f"{coco_file_name(image_id)[:-4]}_{ref_id}.jpg",
                     "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
        return ref_id

    for index, (image_id, width, height, kind, split_index) in enumerate(_IMAGES):
        split = splits[split_index % len(splits)]
        path = images_dir / coco_file_name(image_id)
        _save_image(path, kind, _texture(rng, width, height, kind == "grayscale"))
        image_paths[image_id] = path
        images.append({"id": image_id, "file_name": coco_file_name(image_id), "width": width, "height": height})

        # One single-part and one two-part (overlapping) polygon per image.
        single = [_polygon(rng, width * 0.3, height * 0.4, min(width, height) * 0.25, 6 + index % 3)]
        multi = [_polygon(rng, width * 0.65, height * 0.6, min(width, height) * 0.2, 5),
                 _polygon(rng, width * 0.75, height * 0.7, min(width, height) * 0.15, 7)]
        for parts, category_id in ((single, 1), (multi, 62)):
            annotations.append({"id": next_ann, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                                "segmentation": parts, "bbox": _polygon_bbox(parts), "area": 1.0})
            next_ann += 1
        add_ref(next_ann - 2, image_id, 1, split, [f"person number {index} on the left", "the café sign ñ 人"])
        add_ref(next_ann - 2, image_id, 1, split, [f"same person, other words {index}"], raw_only=index == 1)
        add_ref(next_ann - 1, image_id, 62, split, [f"chair {index}", f"the two-part chair {index}", "right thing"])

        if index == 1:  # a crowd annotation stored as uncompressed RLE
            mask = np.zeros((height, width), dtype=bool)  # (H, W)
            mask[5:20, 8:30] = True
            mask[30:40, 2:12] = True
            ys, xs = np.nonzero(mask)
            annotations.append({"id": next_ann, "image_id": image_id, "category_id": 18, "iscrowd": 1,
                                "segmentation": {"size": [height, width], "counts": _uncompressed_rle(mask)},
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)], "area": float(mask.sum())})
            next_ann += 1
            add_ref(next_ann - 1, image_id, 18, split, ["the crowd of dogs"])

    fault_ids: dict[str, int] = {}
    first_id, first_split = _IMAGES[0][0], splits[0]
    if "missing_image" in faults:
        victim = _IMAGES[-1][0]
        image_paths[victim].unlink()
        fault_ids["missing_image"] = victim
    if "missing_annotation" in faults:
        fault_ids["missing_annotation"] = add_ref(999_999, first_id, 1, first_split, ["nothing there"])
    if "degenerate_polygon" in faults:
        annotations.append({"id": next_ann, "image_id": first_id, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[1.0, 1.0, 5.0, 5.0]], "bbox": [1.0, 1.0, 4.0, 4.0], "area": 0.0})
        next_ann += 1
        fault_ids["degenerate_polygon"] = add_ref(next_ann - 1, first_id, 1, first_split, ["a line, not an area"])
    if "missing_image_record" in faults:
        fault_ids["missing_image_record"] = add_ref(1000, 777_777, 1, first_split, ["an image nobody has"])
    if "no_sentences" in faults:
        fault_ids["no_sentences"] = add_ref(1000, first_id, 1, first_split, [])

    instances = {"info": {"description": "sgdata test fixture"}, "images": images, "annotations": annotations,
                 "categories": CATEGORIES}
    instances_path = dataset_dir / "instances.json"
    instances_path.write_text(json.dumps(instances), encoding="utf-8")
    refs_path = dataset_dir / f"refs({split_by}).p"
    with open(refs_path, "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    return {
        "refer_root": refer_root,
        "images_dir": images_dir,
        "dataset": dataset,
        "split_by": split_by,
        "splits": splits,
        "instances_path": instances_path,
        "refs_path": refs_path,
        "instances": instances,
        "refs": refs,
        "image_paths": image_paths,
        "exif_image_id": 318219,
        "faults": fault_ids,
    }

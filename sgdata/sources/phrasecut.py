"""PhraseCut (the VGPhraseCut v0 layout) as a source: one sample per image with every phrase and its mask.

The layout under ROOT:
- `image_data_split.json`: a list of images, each with `image_id`, `split`, `width`, `height`;
- `refer_<split>.json` for train, val, test and miniv (a small subset of val): a list of tasks, each
  with `task_id`, `image_id`, `phrase`, `phrase_structure` (its `name` is kept as the category),
  `instance_boxes` and `Polygons`: per instance of the referent a list of polygons, each a list of
  [x, y] points;
- `images/<image_id>.jpg`.

The referent's mask is the union of all its instances, drawn as the dataset's own tools draw it:
every polygon filled with Pillow (outline included), its coordinates truncated to ints; a polygon
of fewer than 2 points is skipped. A task with no polygon left is a `no_polygon` failure. The box
is the one around the polygons (x, y, width, height). The samples have the RefCOCO sample format
(`refer_sample.finalize` writes them), so training and evaluation read them unchanged.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sgdata.format.errors import SampleError, UserError
from sgdata.format.rle import mask_to_rle
from sgdata.refer import load_json
from sgdata.sources.base import Failure, Finalized, Option, SampleSpec, SourcePlan, StoredImage
from sgdata.sources.refer_plan import is_id, is_text, sample_key
from sgdata.sources.refer_sample import finalize as finalize_refs

SPLITS = ("train", "val", "test", "miniv")
DEFAULT_SPLITS = ("train", "val", "test")  # miniv repeats part of val


def _point(value: Any) -> tuple[float, float] | None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        return None
    x, y = value
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (x, y)):
        return None
    return float(x), float(y)


def task_polygons(task: dict) -> list[list[list[float]]]:
    """Every drawable polygon of the task's instances (2 or more finite points), as [[x, y], ...] lists."""
    polygons = []
    instances = task.get("Polygons")
    for instance in instances if isinstance(instances, list) else []:
        for polygon in instance if isinstance(instance, list) else []:
            points = [_point(p) for p in polygon] if isinstance(polygon, list) else []
            if len(points) >= 2 and all(p is not None for p in points):
                polygons.append([list(p) for p in points])
    return polygons


def draw_mask(polygons: list[list[list[float]]], width: int, height: int) -> np.ndarray:
    """The union of the polygons as PhraseCut draws them: Pillow fill and outline, int-truncated points. (H, W) bool."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon([(int(x), int(y)) for x, y in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)  # (H, W)


def _box(polygons: list[list[list[float]]]) -> list[float]:
    xs = [x for polygon in polygons for x, _ in polygon]
    ys = [y for polygon in polygons for _, y in polygon]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _check_root(root: Path, splits: list[str] | None) -> list[str]:
    if not root.is_dir():
        raise UserError(f"PhraseCut root {root} does not exist or is not a folder.")
    present = [s for s in SPLITS if (root / f"refer_{s}.json").is_file()]
    if splits:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise UserError(f"split '{unknown[0]}' is not a PhraseCut split; use {', '.join(SPLITS)}.")
        absent = [s for s in splits if s not in present]
        if absent:
            raise UserError(f"{root} has no refer_{absent[0]}.json (present: "
                            f"{', '.join(f'refer_{s}.json' for s in present) or 'none'}).")
        return list(dict.fromkeys(splits))
    chosen = [s for s in DEFAULT_SPLITS if s in present] or present
    if not chosen:
        raise UserError(f"{root} holds no refer_<split>.json file; is it the VGPhraseCut v0 folder?")
    return chosen


def _image_records(root: Path, failures: list[Failure]) -> dict[Any, dict]:
    """image_id -> record of image_data_split.json; entries without an id or a positive size are reported."""
    path = root / "image_data_split.json"
    entries = load_json(path, "PhraseCut image list")
    if not isinstance(entries, list):
        raise UserError(f"PhraseCut image list {path} holds a JSON {type(entries).__name__}, not a list of images.")
    images = {}
    for index, entry in enumerate(entries):
        ok = isinstance(entry, dict) and is_id(entry.get("image_id")) and all(
            isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and entry[k] > 0
            for k in ("width", "height"))
        if ok:
            images.setdefault(entry["image_id"], entry)
        else:
            failures.append(Failure(f"image_data_split.json#{index}", "malformed_image_record",
                                    f"entry {index} lacks an image_id or a positive width and height", ""))
    return images


def _entry(task: Any, index: int, split: str, label: str, failures: list[Failure]) -> tuple[Any, dict] | None:
    """(image_id, the ref entry of one task), or None with a Failure saying why the task is dropped."""
    def fail(reason: str, detail: str) -> None:
        failures.append(Failure(label, reason, detail, split))

    if not (isinstance(task, dict) and is_id(task.get("task_id")) and is_id(task.get("image_id"))):
        fail("malformed_task", f"task {index} is not a record with a task_id and an image_id")
        return None
    task_id = task["task_id"]
    phrase = task.get("phrase")
    if not (is_text(phrase) and phrase.strip()):
        fail("blank_sentence", f"task {task_id} has no phrase (blank, missing or not text)")
        return None
    polygons = task_polygons(task)
    if not polygons:
        fail("no_polygon", f"task {task_id} ({phrase.strip()!r}): its referent has no polygon of 2 or more points")
        return None
    structure = task.get("phrase_structure")
    name = structure.get("name") if isinstance(structure, dict) else None
    return task["image_id"], {
        "ref_id": task_id,
        "ann_id": None,
        "category_id": None,
        "category": name if is_text(name) else "",
        "bbox": _box(polygons),
        "sentences": [{"sent_id": 0, "text": phrase.strip()}],
        "polygons": polygons,
    }


def plan_phrasecut(root: str | Path, splits: list[str] | None = None) -> SourcePlan:
    """Read and check the PhraseCut tasks; one SampleSpec per (split, image), sorted by key."""
    root = Path(root)
    selected = _check_root(root, splits)
    failures: list[Failure] = []
    images = _image_records(root, failures)
    specs: dict[str, list[SampleSpec]] = {}
    counts = {}
    for split in selected:
        refer_path = root / f"refer_{split}.json"
        tasks = load_json(refer_path, "PhraseCut task list")
        if not isinstance(tasks, list):
            raise UserError(f"PhraseCut task list {refer_path} holds a JSON {type(tasks).__name__}, not a list of tasks.")
        by_image: dict[Any, list[dict]] = defaultdict(list)
        for index, task in enumerate(tasks):
            task_id = task.get("task_id") if isinstance(task, dict) and is_id(task.get("task_id")) else None
            label = f"{refer_path.name}#task_id={task_id}" if task_id is not None else f"{refer_path.name}#{index}"
            found = _entry(task, index, split, label, failures)
            if found is not None:
                by_image[found[0]].append(found[1])
        specs[split] = []
        for image_id, entries in sorted(by_image.items(), key=lambda item: sample_key(item[0])):
            image = images.get(image_id)
            path = os.path.join(root, "images", f"{image_id}.jpg")
            if image is None:
                reason, detail = "missing_image_record", f"image {image_id} is not in image_data_split.json"
            elif not os.path.isfile(path):
                reason, detail = "missing_image_file", f"image {image_id} has no file images/{image_id}.jpg"
            else:
                record = {"image_id": image_id, "file_name": f"{image_id}.jpg", "width": image["width"],
                          "height": image["height"], "dataset": "phrasecut", "split": split,
                          "refs_file": refer_path.name, "sizes_from": "image_data_split.json", "refs": entries}
                specs[split].append(SampleSpec(key=sample_key(image_id), image_path=path, record=record))
                continue
            failures += [Failure(f"{refer_path.name}#task_id={e['ref_id']}", reason, detail, split) for e in entries]
        counts[split] = {"images": len(specs[split]), "phrases": sum(len(s.record["refs"]) for s in specs[split])}
    if not any(specs.values()) and not failures:
        raise UserError(f"no sample could be built: the PhraseCut task lists in {root} are empty.")
    empty = [split for split in selected if not specs[split]]
    card = {"source": "phrasecut", "root": str(root), "splits": counts, "empty_splits": empty,
            "notes": [f"split '{split}' has no usable phrases; no shards are written for it." for split in empty]}
    return SourcePlan(kind="phrasecut", splits={s: v for s, v in specs.items() if v}, failures=failures, card=card)


def finalize(record: dict, image: StoredImage) -> Finalized:
    """Each phrase's polygons drawn into its mask at the raw image size, then the RefCOCO sample path."""
    width, height = int(record["width"]), int(record["height"])
    refs, failures = [], []
    for entry in record["refs"]:
        mask = draw_mask(entry["polygons"], width, height)  # (H, W)
        if not mask.any():
            failures.append(Failure(f"{record['refs_file']}#task_id={entry['ref_id']}", "empty_mask",
                                    "its polygons lie outside the image", record["split"]))
            continue
        refs.append({key: value for key, value in entry.items() if key != "polygons"} | {
            "segmentation": mask_to_rle(mask)})
    if not refs:
        raise SampleError("no_usable_refs", f"image {record['image_id']}: no phrase has a mask inside the image")
    result = finalize_refs({**record, "refs": refs}, image)
    result.failures = failures + result.failures
    return result


class PhraseCutSource:
    """`sgdata build phrasecut --root DIR`: the VGPhraseCut v0 files and images."""

    name = "phrasecut"
    command = "phrasecut"
    help = "Shards of PhraseCut (VGPhraseCut v0 layout): one sample per image with every phrase and its mask."
    options = (
        Option("root", "The PhraseCut folder (image_data_split.json, refer_<split>.json, images/<image_id>.jpg).",
               "path", required=True),
        Option("splits", "Comma-separated splits of train, val, test, miniv (default: train,val,test present).",
               "splits"),
    )
    layout = ()

    def plan(self, *, root, splits=None) -> SourcePlan:
        return plan_phrasecut(root, splits)

    finalize = staticmethod(finalize)


SOURCE = PhraseCutSource()

"""A small PhraseCut dataset in the VGPhraseCut v0 layout, written to disk for the sgdata tests.

`make_phrasecut_fixture(root)` writes `image_data_split.json`, `refer_train.json`, `refer_val.json` and
textured JPEGs under `images/`, and returns the tasks so a test can draw the expected masks itself.
It covers: a referent of two instances (one with two polygons, fractional and negative coordinates,
a point outside the image), a polygon of 2 points (a line) beside one of 1 point (skipped), and the
bad tasks listed in `BAD_TASKS` with the failure reason each must give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = {101: (48, 40, "train"), 102: (40, 52, "train"), 201: (56, 44, "val"), 202: (44, 44, "val")}
BAD_TASKS = {"102__2": "no_polygon", "102__3": "blank_sentence", "102__4": "no_polygon",
             "999__1": "missing_image_record"}


def _tasks() -> dict[str, list[dict]]:
    def task(image_id, n, phrase, polygons, name="thing"):
        return {"task_id": f"{image_id}__{n}", "image_id": image_id, "phrase": phrase,
                "phrase_structure": {"name": name, "attributes": [], "relation_descriptions": [], "type": "name"},
                "instance_boxes": [[0, 0, 1, 1] for _ in polygons], "Polygons": polygons}

    return {
        "train": [
            task(101, 1, "two people on the left", [
                [[[2.7, 3.2], [20.9, 4.1], [18.5, 25.6], [4.0, 22.2]], [[30.5, 30.5], [38.9, 31.0], [35.2, 39.9]]],
                [[[-3.5, 10.0], [9.9, 12.5], [6.0, 38.7]]],
            ], name="person"),
            task(101, 2, "the thin pole", [[[[40.2, 2.0], [40.8, 35.6]], [[1.0, 1.0]]]], name="pole"),
            task(102, 1, "red car", [[[[5.0, 5.0], [35.0, 6.0], [36.0, 30.0], [60.0, 45.0], [4.0, 29.0]]]], name="car"),
            task(102, 2, "nothing drawn", []),
            task(102, 3, "   ", [[[[1, 1], [5, 1], [5, 5]]]]),
            task(102, 4, "a single point", [[[[3.0, 3.0]]], [[]]]),
        ],
        "val": [
            task(201, 1, "big tree", [[[[10.0, 2.0], [50.0, 8.0], [30.0, 40.0]]]], name="tree"),
            task(201, 2, "small window", [[[[2.2, 30.1], [12.8, 30.1], [12.8, 42.9], [2.2, 42.9]]]], name="window"),
            task(202, 1, "the dog", [[[[8.0, 8.0], [30.0, 10.0], [28.0, 36.0], [9.0, 33.0]]]], name="dog"),
            task(999, 1, "an image nobody has", [[[[1, 1], [5, 1], [5, 5]]]]),
        ],
    }


def make_phrasecut_fixture(root: Path, seed: int = 0) -> dict:
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for image_id, (width, height, _) in IMAGES.items():
        ys, xs = np.mgrid[0:height, 0:width]  # (H, W)
        pixels = np.stack([(xs * 5 + ys * 3 + 40 * c) % 256 for c in range(3)], axis=-1)  # (H, W, 3)
        pixels = np.clip(pixels + rng.integers(0, 30, size=pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg", quality=90)
    split_list = [{"image_id": i, "split": s, "width": w, "height": h, "url": f"https://example.invalid/{i}.jpg"}
                  for i, (w, h, s) in IMAGES.items()]
    (root / "image_data_split.json").write_text(json.dumps(split_list))
    tasks = _tasks()
    for split, split_tasks in tasks.items():
        (root / f"refer_{split}.json").write_text(json.dumps(split_tasks))
    return {"root": root, "tasks": tasks, "images": IMAGES}

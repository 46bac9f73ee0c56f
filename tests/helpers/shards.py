"""Small shards in sgdata's documented format, written directly, for the sgmodel tests.

The sgmodel unit tests should not depend on a whole `sgdata build`: these helpers write what the
format (docs/data-format.md) promises — one sample per image, `jpg` + `json`, per split a
sizes.json — with a few coloured rectangles per image and one referring phrase per rectangle, so
masks and phrases can be checked. The end-to-end test uses real sgdata-built shards instead.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from sgdata.format import mask_to_rle

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _scene(rng: np.random.Generator, width: int, height: int) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    pixels = rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3) noisy grey
    objects = []
    for name, colour in COLOURS.items():
        h, w = int(rng.integers(height // 6, height // 3)), int(rng.integers(width // 6, width // 3))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        mask = np.zeros((height, width), dtype=bool)
        mask[y : y + h, x : x + w] = True
        pixels[mask] = colour
        objects.append((name, mask))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), objects


def write_shards(folder: Path, sizes: list[int], kind: str = "refcoco", split: str = "train", seed: int = 0,
                 image_size: tuple[int, int] = (40, 48), sizes_json: bool = True) -> list[str]:
    """Write len(sizes) shards `split-NNNNNN.tar` with sizes[i] samples each; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, counts, index = [], {}, 0
    for shard, count in enumerate(sizes):
        path = folder / f"{split}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(count):
                height, width = image_size
                jpg, objects = _scene(rng, width + index % 3, height)
                key = f"{split}_{seed}_{index:06d}"
                if kind == "refcoco":
                    meta = {"image_id": index, "file_name": f"{key}.jpg", "width": width + index % 3, "height": height,
                            "dataset": "fixture", "split": split,
                            "refs": [{"ref_id": 10 * index + k, "ann_id": k, "category_id": 1, "category": "box", "bbox": [0, 0, 1, 1],
                                      "sentences": [{"sent_id": 2 * k, "text": f"the {name} box"}, {"sent_id": 2 * k + 1, "text": f"{name} one"}],
                                      "mask": mask_to_rle(mask)}
                                     for k, (name, mask) in enumerate(objects)]}
                else:
                    meta = {"source": f"{key}.jpg", "width": width + index % 3, "height": height,
                            "captions": [f"a picture with {name}" for name, _ in objects]}
                sample = {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}
                if kind != "refcoco":
                    sample["txt"] = meta["captions"][0].encode()
                sink.write(sample)
                index += 1
        paths.append(str(path))
        counts[path.name] = count
    if sizes_json:
        (folder / "sizes.json").write_text(json.dumps(counts))
    return paths

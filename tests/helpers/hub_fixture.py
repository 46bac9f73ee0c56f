"""The refer fixture's refs rewritten as Hugging Face Hub parquet files (the jxu124/refcoco schema).

`write_hub_parquet(fixture, folder)` writes `folder/data/<hub split>-00000-of-00001-<hash>.parquet`,
one row per ref with the columns those copies have: `raw_anns` and `raw_image_info` as JSON text,
`bbox` as x1, y1, x2, y2 (the COCO annotation's x, y, w, h converted), the Hub split names
(`validation`, and `test` for testA), and the other columns a reader must ignore. `edit_row`
lets a test damage single rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

HUB_SPLIT = {"train": "train", "val": "validation", "testA": "test", "testB": "testB", "test": "test"}


def hub_rows(fixture: dict) -> dict[str, list[dict]]:
    """Hub split -> rows, from a `make_refer_fixture` result (refs in their pickle order)."""
    images = {image["id"]: image for image in fixture["instances"]["images"]}
    annotations = {ann["id"]: ann for ann in fixture["instances"]["annotations"]}
    rows: dict[str, list[dict]] = {}
    for ref in fixture["refs"]:
        annotation = annotations.get(ref["ann_id"], {"id": ref["ann_id"], "bbox": [0, 0, 1, 1]})
        image = images.get(ref["image_id"], {"id": ref["image_id"], "file_name": "nowhere.jpg", "width": 1, "height": 1})
        x, y, w, h = annotation["bbox"]
        rows.setdefault(HUB_SPLIT[ref["split"]], []).append({
            "sent_ids": [s["sent_id"] for s in ref["sentences"]],
            "file_name": ref["file_name"],
            "ann_id": ref["ann_id"],
            "ref_id": ref["ref_id"],
            "image_id": ref["image_id"],
            "split": ref["split"],
            "sentences": [{"raw": s["raw"], "sent": s["sent"], "sent_id": s["sent_id"], "tokens": s["tokens"]}
                          for s in ref["sentences"]],
            "category_id": ref["category_id"],
            "raw_anns": json.dumps(annotation),
            "raw_image_info": json.dumps(image),
            "raw_sentences": json.dumps(ref["sentences"]),
            "image_path": f"coco/train2014/{image['file_name']}",
            "bbox": [x, y, x + w, y + h],
            "captions": [s["sent"] or s["raw"] for s in ref["sentences"]],
            "global_image_id": f"coco.{ref['image_id']}",
            "anns_id": str(ref["ann_id"]),
        })
    return rows


def write_hub_parquet(fixture: dict, folder: Path, edit_row: Callable[[str, int, dict], dict | None] | None = None) -> Path:
    """Write the parquet files; `edit_row(hub_split, index, row)` may return a changed row (None: keep it)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([
        ("sent_ids", pa.list_(pa.int64())), ("file_name", pa.string()), ("ann_id", pa.int64()),
        ("ref_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()),
        ("sentences", pa.list_(pa.struct([("raw", pa.string()), ("sent", pa.string()), ("sent_id", pa.int64()),
                                          ("tokens", pa.list_(pa.string()))]))),
        ("category_id", pa.int64()), ("raw_anns", pa.string()), ("raw_image_info", pa.string()),
        ("raw_sentences", pa.string()), ("image_path", pa.string()), ("bbox", pa.list_(pa.float64())),
        ("captions", pa.list_(pa.string())), ("global_image_id", pa.string()), ("anns_id", pa.string()),
    ])
    for split, rows in hub_rows(fixture).items():
        if edit_row is not None:
            rows = [edit_row(split, i, dict(row)) or row for i, row in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / f"{split}-00000-of-00001-0a1b2c3d.parquet")
    return Path(folder)

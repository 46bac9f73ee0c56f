"""The RefCOCO family from its Hugging Face Hub parquet copies (jxu124/refcoco, refcocoplus, refcocog).

`sgdata build refcoco --hub-parquet DIR` reads the files as a Hub download leaves them,
`DIR/data/<split>-NNNNN-of-NNNNN-*.parquet` (or those files directly in DIR); `--hub-repo REPO
--revision SHA` downloads them first. The facts this reader relies on:

- one row per ref, with `ref_id`, `ann_id`, `image_id`, `category_id`, `sentences` (a list of
  {raw, sent, sent_id, tokens}), `raw_anns` (the COCO annotation as a JSON string: polygons in
  `segmentation`, `bbox` as x, y, width, height) and `raw_image_info` (the COCO image record as a
  JSON string: `id`, `file_name`, `width`, `height`); the row's own `bbox` column is x1, y1, x2, y2
  and is read only when `raw_anns` has no box;
- the Hub splits are `train`, `validation`, `test`, `testB` for refcoco and refcoco+, where `test` is
  the refer toolkit's testA, and `train`, `validation`, `test` for refcocog; the splitBy is implied
  (unc for refcoco and refcoco+, umd for refcocog) and written nowhere in the rows;
- images are not in the files: they come from a local COCO train2014 folder (`--images`);
- category names are not in the rows: they are COCO's, listed below.

Each row becomes a refer-toolkit ref plus the annotation and image record it points to, and from
there the refs take the same path as the refer layout's (`refer_plan.plan_refs`,
`refer_sample.finalize`): the same refs give byte-identical shards, with the same checks and failure
reasons. A row whose `raw_anns` or `raw_image_info` is not a JSON object is a `malformed_row` failure
(they are parsed as JSON, never evaluated).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from sgdata.format.errors import UserError
from sgdata.sources.base import Failure, Option, SourcePlan
from sgdata.sources.caption_table import read_parquet
from sgdata.sources.refer_plan import is_id, plan_refs
from sgdata.sources.refer_sample import finalize

HUB_REPOS = {"refcoco": "jxu124/refcoco", "refcoco+": "jxu124/refcocoplus", "refcocog": "jxu124/refcocog"}
IMPLIED_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# Hub split -> the refer toolkit's name for it (the output folders and the samples use the latter).
HUB_SPLITS = {
    "refcoco": {"train": "train", "validation": "val", "test": "testA", "testB": "testB"},
    "refcoco+": {"train": "train", "validation": "val", "test": "testA", "testB": "testB"},
    "refcocog": {"train": "train", "validation": "val", "test": "test"},
}
PARQUET_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d{5}-of-\d{5}(?:-[^/]*)?\.parquet$")
REQUIRED_COLUMNS = ("ref_id", "ann_id", "image_id", "sentences", "raw_anns", "raw_image_info")
OPTIONAL_COLUMNS = ("category_id", "split", "bbox")
INSTANCES_NAME = "raw_anns/raw_image_info"  # what failures call the COCO records carried by the rows
# COCO's category ids and names (the refer toolkit's instances.json carries the same list).
COCO_CATEGORIES = dict(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
), start=1))


def refer_split(dataset: str, name: str) -> str:
    """A Hub split name as the refer toolkit names it ("test" of refcoco is "testA"); other names unchanged."""
    return HUB_SPLITS.get(dataset, {}).get(name, name)


def _json_object(value: Any, column: str) -> tuple[dict | None, str]:
    """(the parsed object, "") or (None, why not): JSON text only, parsed with json.loads and nothing else."""
    if not isinstance(value, str):
        return None, f"{column} is {type(value).__name__}, not JSON text"
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError) as exc:
        return None, f"{column} is not valid JSON ({str(exc)[:120]})"
    if not isinstance(parsed, dict):
        return None, f"{column} is a JSON {type(parsed).__name__}, not an object"
    return parsed, ""


def xyxy_to_xywh(box: Any) -> list[float] | None:
    """The row's `bbox` column (x1, y1, x2, y2) as COCO's x, y, width, height; None when it is not 4 numbers."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def parquet_files(folder: Path) -> list[tuple[str, Path]]:
    """(Hub split, file) for every `<split>-NNNNN-of-NNNNN*.parquet` in DIR/data or DIR, in name order."""
    for candidate in (folder / "data", folder):
        files = sorted(p for p in candidate.glob("*.parquet") if PARQUET_NAME.match(p.name)) if candidate.is_dir() else []
        if files:
            return [(PARQUET_NAME.match(p.name)["split"], p) for p in files]
    raise UserError(f"no Hub parquet file (<split>-NNNNN-of-NNNNN-*.parquet) in {folder / 'data'} or {folder}.")


def download(repo: str, revision: str | None) -> Path:
    """The Hub repository's parquet files, fetched (or found in the local Hub cache) at a pinned revision."""
    if not revision:
        raise UserError("--hub-repo needs --revision (a commit of the dataset repository), so a rebuild reads the same files.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision,
                                      allow_patterns=["data/*.parquet"]))
    except Exception as exc:  # offline, unknown repo or revision, no permission: all one sentence
        raise UserError(f"cannot fetch {repo} at {revision} from the Hugging Face Hub ({type(exc).__name__}); "
                        "download its data/*.parquet files where a network is at hand and pass --hub-parquet DIR.") from None


def _read_rows(path: Path, split: str, records: dict[str, Any], failures: list[Failure]) -> None:
    """Add each row of one parquet file to `records` as a ref, an annotation and an image record."""
    import pyarrow.parquet as pq

    try:
        present = set(pq.read_schema(path).names)
    except Exception:  # read_parquet below gives the one-sentence reason
        present = set(REQUIRED_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise UserError(f"the parquet file {path.name} has no {', '.join(missing)} column; is it a jxu124/refcoco copy?")
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in present]
    for index, row in enumerate(read_parquet(path, columns).to_pylist()):
        label = f"{path.name}:{index + 1}"
        annotation, problem = _json_object(row["raw_anns"], "raw_anns")
        image, image_problem = _json_object(row["raw_image_info"], "raw_image_info")
        problem = problem or image_problem
        stated = row.get("split")
        if not problem and isinstance(stated, str) and refer_split(records["dataset"], stated) != split:
            problem = f"its split column says {stated!r} but it is in the {path.name.split('-')[0]} file"
        if problem:
            failures.append(Failure(label, "malformed_row", f"ref {row.get('ref_id')}: {problem}", split))
            continue
        if "bbox" not in annotation and xyxy_to_xywh(row.get("bbox")) is not None:
            annotation["bbox"] = xyxy_to_xywh(row["bbox"])
        ref = {"ref_id": row["ref_id"], "ann_id": row["ann_id"], "image_id": row["image_id"], "split": split,
               "sentences": row["sentences"]}
        if row.get("category_id") is not None:
            ref["category_id"] = row["category_id"]
        records["refs"].append(ref)
        if is_id(annotation.get("id")):  # an annotation or image without an id is reported by the planner
            records["annotations"].setdefault(annotation["id"], annotation)
        else:
            records["bad_annotations"].append(annotation)
        if is_id(image.get("id")):
            records["images"].setdefault(image["id"], image)
        else:
            records["bad_images"].append(image)


def plan_hub(
    images: str | Path,
    dataset: str,
    hub_parquet: str | Path | None = None,
    hub_repo: str | None = None,
    revision: str | None = None,
    split_by: str | None = None,
    splits: list[str] | None = None,
) -> SourcePlan:
    """Read and check the parquet rows of one dataset; one SampleSpec per (split, image), as the refer layout's."""
    if dataset not in HUB_SPLITS:
        raise UserError(f"--dataset {dataset} has no Hub parquet copy; use {', '.join(HUB_SPLITS)}.")
    implied = IMPLIED_SPLIT_BY[dataset]
    if split_by is not None and split_by != implied:
        raise UserError(f"the Hub copy of {dataset} is split by {implied}; --split-by {split_by} does not apply.")
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist or is not a folder.")
    if hub_parquet is not None:
        folder = Path(hub_parquet)
        if not folder.is_dir():
            raise UserError(f"--hub-parquet {folder} does not exist or is not a folder.")
    else:
        folder = download(hub_repo, revision)
    wanted = [refer_split(dataset, s) for s in splits] if splits else None
    files = parquet_files(folder)
    records: dict[str, Any] = {"dataset": dataset, "refs": [], "annotations": {}, "images": {},
                               "bad_annotations": [], "bad_images": []}
    failures: list[Failure] = []
    for hub_split, path in files:
        split = refer_split(dataset, hub_split)
        if wanted is None or split in wanted:
            _read_rows(path, split, records, failures)
    instances = {
        "images": list(records["images"].values()) + records["bad_images"],
        "annotations": list(records["annotations"].values()) + records["bad_annotations"],
        "categories": [{"id": i, "name": name} for i, name in COCO_CATEGORIES.items() if name],
    }
    card = {"source": "refcoco-hub", "hub_parquet": str(folder), "hub_repo": hub_repo, "revision": revision,
            "images_dir": str(images_dir), "parquet_files": [p.name for _, p in files]}
    return plan_refs(records["refs"], instances, images_dir, dataset, implied, wanted, refs_label=str(folder),
                     refs_name=f"the parquet files in {folder}", instances_name=INSTANCES_NAME, card=card,
                     failures=failures)


class HubSource:
    """`sgdata build refcoco --hub-parquet DIR` (or `--hub-repo REPO --revision SHA`): the Hub parquet copies."""

    name = "refcoco-hub"
    command = "refcoco"
    help = "Shards of a RefCOCO-family dataset from its Hub parquet copy."
    options = (
        Option("hub_parquet", "A download of jxu124/refcoco, refcocoplus or refcocog (DIR/data/*.parquet); "
               "replaces --refer-root.", "path"),
        Option("hub_repo", "Fetch the parquet files of this Hub dataset first, e.g. jxu124/refcoco (needs a network).",
               "text"),
        Option("revision", "With --hub-repo: the dataset repository's commit to read.", "text"),
        Option("images", "Folder of the COCO train2014 images.", "path", required=True),
        Option("dataset", "refcoco, refcoco+ or refcocog.", required=True),
        Option("split_by", "unc, umd or google (implied by the Hub copies: unc, or umd for refcocog).", "text"),
        Option("splits", "Comma-separated splits (default: all), e.g. val,testA.", "splits"),
    )
    layout = ("hub_parquet", "hub_repo")

    def plan(self, **options) -> SourcePlan:
        return plan_hub(**options)

    finalize = staticmethod(finalize)


SOURCE = HubSource()

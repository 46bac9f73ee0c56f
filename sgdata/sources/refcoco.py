"""The RefCOCO family (refer toolkit layout) as a source: plan on the driver, finalize per sample.

`plan_refcoco` reads `ROOT/<dataset>/instances.json` and `ROOT/<dataset>/refs(<splitBy>).p`, checks
every ref, and groups the refs by (split, image): one sample per image, carrying all its
referring expressions. Per-ref problems (missing annotation, degenerate polygon, no sentence...)
become Failures and only that ref is dropped; problems with the whole input are UserErrors.
Everything that reaches a worker is checked here to be writable: ids are ints or text (dict keys
and JSON values), texts are valid Unicode, RLE counts describe exactly one mask of the image's size,
and split names are plain folder names.

`finalize` runs in the workers with the stored image in hand and produces the sample JSON, with
each mask and box carried through the same orientation and resize the image went through.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sgdata.errors import UserError
from sgdata.images import oriented_size
from sgdata.masks import (
    SegmentationError, check_rle, clean_polygons, resize_rles, segmentation_to_rle, transpose_rle,
)
from sgdata.refer import load_instances, load_refs
from sgdata.sources.base import Failure, Finalized, Option, SampleError, SourcePlan, SampleSpec, StoredImage

# The published (dataset, splitBy) pairs and the splits each one defines.
KNOWN_SPLITS = {
    ("refcoco", "unc"): ["train", "val", "testA", "testB"],
    ("refcoco+", "unc"): ["train", "val", "testA", "testB"],
    ("refcocog", "umd"): ["train", "val", "test"],
    ("refcocog", "google"): ["train", "val"],
}
KNOWN_SPLIT_BY = {"refcoco": ["unc"], "refcoco+": ["unc"], "refcocog": ["umd", "google"]}
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a split names a folder of OUT: no path, no dot
REF_KEYS = ("ref_id", "ann_id", "image_id", "split")
# Sentences dropped from a ref that keeps others: reason -> what the failure's detail calls them.
DROPPED_SENTENCES = {
    "blank_sentence": "blank or malformed sentence(s)",
    "undecodable_text": "sentence(s) that are not valid Unicode text (a lone surrogate)",
}


def is_text(value: Any) -> bool:
    """A str that can be written as UTF-8: a Python 3 pickle or a JSON "\\ud800" escape can hold lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_id(value: Any) -> bool:
    """An id usable as a dict key and a JSON value: an int (COCO's) or non-blank text (a hand-made set's).

    Lists, dicts, sets, floats (NaN among them) and booleans are refused while planning, so no
    such id reaches a lookup (unhashable) or a sample's JSON (not writable).
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (is_text(value) and bool(value.strip()))


def _short(value: Any) -> str:
    """A value as a failure detail shows it: its repr, cut to one short phrase."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ref_problem(ref: Any) -> str | None:
    """Why a refs entry cannot be planned at all (then it is a `malformed_ref`), or None."""
    if not isinstance(ref, dict):
        return f"the entry is a {type(ref).__name__}, not a ref record"
    missing = [key for key in REF_KEYS if key not in ref]
    if missing:
        return f"the entry lacks {'/'.join(missing)}"
    if not (is_text(ref["split"]) and SPLIT_NAME.match(ref["split"])):
        return f"split {_short(ref['split'])} is not a plain name (letters, digits, _ and -)"
    for key in ("ref_id", "ann_id", "image_id"):
        if not is_id(ref[key]):
            return f"{key} {_short(ref[key])} is not an int or a text id"
    if ref.get("category_id") is not None and not is_id(ref["category_id"]):
        return f"category_id {_short(ref['category_id'])} is not an int or a text id"
    return None


def _readable_split(ref: Any) -> str:
    """The entry's split when it can be read (a malformed ref is then reported under it), else ""."""
    split = ref.get("split") if isinstance(ref, dict) else None
    return split if is_text(split) and SPLIT_NAME.match(split) else ""


def sample_key(image_id: Any) -> str:
    """`img000000391895`: zero-padded so key order is id order; no dots (WebDataset splits on the first)."""
    if isinstance(image_id, int) and image_id >= 0:
        return f"img{image_id:012d}"
    text = str(image_id)
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    if clean != text:  # keep "a.b" and "a_b" apart
        clean += "_" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return "img_" + clean


def _id_order(value: Any) -> tuple:
    """Sort key for ids that are ints in COCO but may be anything in a hand-made set."""
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _check_layout(refer_root: Path, images_dir: Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    if not refer_root.is_dir():
        raise UserError(f"refer root {refer_root} does not exist or is not a folder.")
    dataset_dir = refer_root / dataset
    if not dataset_dir.is_dir():
        present = sorted(p.name for p in refer_root.iterdir() if (p / "instances.json").is_file())
        raise UserError(f"dataset folder {dataset_dir} does not exist (datasets under the root: {', '.join(present) or 'none'}).")
    known = KNOWN_SPLIT_BY.get(dataset)
    if known is not None and split_by not in known:
        raise UserError(f"{dataset} has no splitBy '{split_by}'; use {' or '.join(known)}.")
    refs_path = dataset_dir / f"refs({split_by}).p"
    if not refs_path.is_file():
        present = sorted(p.name for p in dataset_dir.glob("refs(*).p"))
        raise UserError(f"refs file {refs_path} does not exist (refs files there: {', '.join(present) or 'none'}).")
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist or is not a folder.")
    return dataset_dir / "instances.json", refs_path


def _sentence_text(sentence: dict) -> tuple[str | None, str | None]:
    """(text, None) from 'sent', else 'raw'; or (None, why) with why a DROPPED_SENTENCES reason."""
    candidates = [sentence.get(field) for field in ("sent", "raw")]
    candidates = [c for c in candidates if isinstance(c, str) and c.strip()]
    for candidate in candidates:
        if is_text(candidate):
            return candidate, None
    return None, "undecodable_text" if candidates else "blank_sentence"


def _sentences(ref: dict) -> tuple[list[dict], Counter]:
    """[{sent_id, text}] from the ref's sentences, and how many were dropped for each reason."""
    kept, dropped = [], Counter()
    sentences = ref.get("sentences")
    for index, sentence in enumerate(sentences if isinstance(sentences, (list, tuple)) else []):
        if not isinstance(sentence, dict) or not is_id(sentence.get("sent_id", index)):
            dropped["blank_sentence"] += 1
            continue
        text, why = _sentence_text(sentence)
        if why is not None:
            dropped[why] += 1
            continue
        kept.append({"sent_id": sentence.get("sent_id", index), "text": text})
    return kept, dropped


def _segmentation_problem(segmentation: Any, height: int, width: int) -> tuple[str, str] | None:
    """None when the segmentation can give a mask, else (reason, why); checked without rasterising."""
    if isinstance(segmentation, dict):
        try:
            check_rle(segmentation, height, width)
        except SegmentationError as exc:
            return "malformed_segmentation", str(exc)
        return None
    if clean_polygons(segmentation):
        return None
    return "degenerate_polygon", "no polygon part has 3 or more finite points"


class _Planner:
    """Holds the indexes of one instances.json while the refs are checked one by one."""

    def __init__(self, dataset: str, refs_path: Path, images_dir: Path, instances: dict):
        self.dataset = dataset
        self.refs_path = refs_path
        self.images_dir = images_dir
        self.failures: list[Failure] = []
        self.images = {im["id"]: im for im in self._records(instances, "images", "malformed_image_record")}
        self.annotations = {a["id"]: a for a in self._records(instances, "annotations", "malformed_annotation")}
        self.categories = {c["id"]: c.get("name", "")
                           for c in self._records(instances, "categories", "malformed_category")}

    def _records(self, instances: dict, key: str, reason: str) -> list[dict]:
        """The records of one instances.json list that have a usable id; the others are reported.

        Such a record belongs to no split (nothing can name it), so its failure has split "".
        """
        good = []
        for index, record in enumerate(instances[key]):
            if not isinstance(record, dict):
                problem = f"is a {type(record).__name__}, not a record"
            elif not is_id(record.get("id")):
                problem = f"has id {_short(record.get('id'))}, not an int or a text id"
            elif key == "categories" and not is_text(record.get("name", "")):
                problem = f"has name {_short(record.get('name'))}, not text"
            else:
                good.append(record)
                continue
            self.fail(reason, f"entry {index} of '{key}' in instances.json {problem}", "",
                      path=f"instances.json#{key}[{index}]")
        return good

    def fail(self, reason: str, detail: str, split: str, ref_id: Any = None, path: str | None = None) -> None:
        where = path if path is not None else f"{self.refs_path}#ref_id={ref_id}"
        self.failures.append(Failure(path=where, reason=reason, detail=detail, split=split))

    def image_path(self, image: dict, split: str) -> str | None:
        """The image file under images_dir, or None (reported) when the record or the file is unusable."""
        file_name = image.get("file_name")
        width, height = image.get("width"), image.get("height")
        if not (is_text(file_name) and _positive_int(width) and _positive_int(height)):
            self.fail("malformed_image_record", f"image {image.get('id')} lacks a file_name or a positive width "
                      "and height in instances.json", split, path=f"instances.json#image_id={image.get('id')}")
            return None
        parts = Path(file_name).parts
        if Path(file_name).is_absolute() or ".." in parts:
            self.fail("unsafe_path", f"file_name {file_name!r} points outside the images folder", split,
                      path=f"instances.json#image_id={image.get('id')}")
            return None
        path = os.path.join(self.images_dir, file_name)
        if not os.path.isfile(path):
            self.fail("missing_image_file", f"image {image.get('id')} has no file {file_name} in {self.images_dir}",
                      split, path=path)
            return None
        return path

    def ref_entry(self, ref: dict, split: str, image: dict) -> dict | None:
        """The record entry of one ref, or None with a Failure saying why the ref is dropped."""
        ref_id = ref.get("ref_id")
        annotation = self.annotations.get(ref.get("ann_id"))
        if annotation is None:
            self.fail("missing_annotation", f"ref {ref_id} names ann_id {ref.get('ann_id')}, which instances.json lacks",
                      split, ref_id)
            return None
        if annotation.get("image_id") != image.get("id"):
            self.fail("annotation_image_mismatch",
                      f"ref {ref_id} is on image {image.get('id')} but its annotation {annotation.get('id')} is on "
                      f"image {annotation.get('image_id')}", split, ref_id)
            return None
        problem = _segmentation_problem(annotation.get("segmentation"), image["height"], image["width"])
        if problem is not None:
            self.fail(problem[0], f"annotation {annotation.get('id')} of ref {ref_id} has no usable segmentation "
                      f"({problem[1]})", split, ref_id)
            return None
        sentences, dropped = _sentences(ref)
        if not sentences:
            reason = "undecodable_text" if dropped["undecodable_text"] else "no_sentences"
            why = ", ".join(f"{count} {DROPPED_SENTENCES[r]}" for r, count in sorted(dropped.items()))
            self.fail(reason, f"ref {ref_id} has no usable sentence" + (f" ({why})" if why else ""), split, ref_id)
            return None
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_finite_number(v) for v in bbox)):
            self.fail("malformed_bbox", f"annotation {annotation.get('id')} of ref {ref_id} has bbox {_short(bbox)}",
                      split, ref_id)
            return None
        category_id = ref.get("category_id", annotation.get("category_id"))
        if category_id is not None and not is_id(category_id):
            self.fail("malformed_annotation", f"annotation {annotation.get('id')} of ref {ref_id} has category_id "
                      f"{_short(category_id)}, not an int or a text id", split, ref_id)
            return None
        for reason, count in sorted(dropped.items()):  # the ref is kept: report what it lost
            self.fail(reason, f"ref {ref_id}: {count} {DROPPED_SENTENCES[reason]} dropped", split, ref_id)
        return {
            "ref_id": ref_id,
            "ann_id": annotation.get("id"),
            "category_id": category_id,
            "category": str(self.categories.get(category_id, "")),
            "bbox": [float(v) for v in bbox],
            "sentences": sentences,
            "segmentation": annotation.get("segmentation"),
        }


def plan_refcoco(
    refer_root: str | Path,
    images_dir: str | Path,
    dataset: str,
    split_by: str,
    splits: list[str] | None = None,
) -> SourcePlan:
    """Read and check one refer dataset; one SampleSpec per (split, image), sorted by key."""
    refer_root, images_dir = Path(refer_root), Path(images_dir)
    instances_path, refs_path = _check_layout(refer_root, images_dir, dataset, split_by)
    instances = load_instances(instances_path)
    refs = load_refs(refs_path)
    planner = _Planner(dataset, refs_path, images_dir, instances)

    found_splits = {r["split"] for r in refs if _readable_split(r)}
    expected = KNOWN_SPLITS.get((dataset, split_by), [])
    available = expected + sorted(found_splits - set(expected))
    if splits:
        unknown = [s for s in splits if s not in available]
        if unknown:
            raise UserError(f"split '{unknown[0]}' is not in {dataset} ({split_by}); available: {', '.join(available)}.")
        selected = list(dict.fromkeys(splits))
    else:
        selected = available

    grouped: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    in_selection = 0  # refs of the selected splits, and malformed ones whose split cannot be read
    for position, ref in enumerate(refs):
        split = _readable_split(ref)
        if split and split not in selected:
            continue
        in_selection += 1
        problem = _ref_problem(ref)
        if problem is not None:
            planner.fail("malformed_ref", f"refs entry {position}: {problem}", split,
                         path=f"{refs_path}#index={position}")
            continue
        grouped[(split, ref["image_id"])].append(ref)
    if not in_selection:
        where = f"0 refs in {refs_path.name}" if not refs else (
            f"{refs_path.name} has no ref in split {', '.join(selected)} (its refs are in "
            f"{', '.join(sorted(found_splits)) or 'no readable split'})")
        raise UserError(f"no sample could be built: {where}.")

    specs: dict[str, list[SampleSpec]] = {split: [] for split in selected}
    counts = {split: {"images": 0, "refs": 0, "sentences": 0} for split in selected}
    for (split, image_id), image_refs in sorted(grouped.items(), key=lambda item: (item[0][0], sample_key(item[0][1]))):
        image = planner.images.get(image_id)
        if image is None:
            for ref in image_refs:
                planner.fail("missing_image_record", f"ref {ref['ref_id']} names image_id {image_id}, which "
                             "instances.json lacks", split, ref["ref_id"])
            continue
        path = planner.image_path(image, split)
        if path is None:
            for ref in image_refs:
                planner.fail("image_unavailable", f"ref {ref['ref_id']} dropped with its image {image_id}",
                             split, ref["ref_id"])
            continue
        entries = [planner.ref_entry(ref, split, image) for ref in sorted(image_refs, key=lambda r: _id_order(r["ref_id"]))]
        entries = [e for e in entries if e is not None]
        if not entries:
            continue
        record = {
            "image_id": image_id,
            "file_name": image["file_name"],
            "width": image["width"],
            "height": image["height"],
            "dataset": dataset,
            "split": split,
            "refs_file": str(refs_path),
            "refs": entries,
        }
        specs[split].append(SampleSpec(key=sample_key(image_id), image_path=path, record=record))
        counts[split]["images"] += 1
        counts[split]["refs"] += len(entries)
        counts[split]["sentences"] += sum(len(e["sentences"]) for e in entries)

    empty = [split for split in selected if not specs[split]]
    notes = [f"split '{split}' has no usable refs; no shards are written for it." for split in empty]
    card = {
        "source": "refcoco",
        "dataset": dataset,
        "split_by": split_by,
        "refer_root": str(refer_root),
        "images_dir": str(images_dir),
        "instances_file": str(instances_path),
        "refs_file": str(refs_path),
        "splits": {split: counts[split] for split in selected},
        "empty_splits": empty,
        "notes": notes,
    }
    return SourcePlan(
        kind="refcoco",
        splits={split: specs[split] for split in selected if specs[split]},
        failures=planner.failures,
        card=card,
    )


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
        raise SampleError("size_mismatch", f"instances.json says {width}x{height} but the file is "
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


class ReferSource:
    """`sgdata build refcoco --refer-root ...`: the refer toolkit's own files."""

    name = "refcoco"
    command = "refcoco"
    help = "Shards of a RefCOCO-family dataset: one sample per image with every ref, sentence and mask."
    options = (
        Option("refer_root", "refer toolkit data root (ROOT/<dataset>/instances.json, refs(<splitBy>).p).",
               "path", required=True),
        Option("images", "Folder of the COCO train2014 images.", "path", required=True),
        Option("dataset", "refcoco, refcoco+ or refcocog.", required=True),
        Option("split_by", "unc, umd or google.", required=True),
        Option("splits", "Comma-separated splits (default: all), e.g. val,testA.", "splits"),
    )
    layout = ("refer_root",)

    def plan(self, *, refer_root, images, dataset, split_by, splits=None) -> SourcePlan:
        return plan_refcoco(refer_root, images, dataset, split_by, splits)

    finalize = staticmethod(finalize)


SOURCE = ReferSource()

"""RefCOCO-family refs checked into a plan, whatever layout they were read from.

`plan_refs` takes the refs (the refer toolkit's records: ref_id, ann_id, image_id, split, sentences)
and the COCO images and annotations they point to, checks every ref, and groups the refs by
(split, image): one sample per image, carrying all its referring expressions. Per-ref problems
(missing annotation, degenerate polygon, no sentence...) become Failures and only that ref is
dropped. Everything that reaches a worker is checked here to be writable: ids are ints or text
(dict keys and JSON values), texts are valid Unicode, RLE counts describe exactly one mask of the
image's size, and split names are plain folder names.

Both the refer toolkit files (`refcoco.py`) and the Hub parquet copies (`refcoco_hub.py`) come
through here and through `refer_sample.finalize`, so the same refs give the same shards byte for
byte, with the same checks and failure reasons.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sgdata.format.errors import SegmentationError, UserError
from sgdata.format.rle import check_rle
from sgdata.masks import clean_polygons
from sgdata.sources.base import Failure, SampleSpec, SourcePlan

# The published (dataset, splitBy) pairs and the splits each one defines.
KNOWN_SPLITS = {
    ("refcoco", "unc"): ["train", "val", "testA", "testB"],
    ("refcoco+", "unc"): ["train", "val", "testA", "testB"],
    ("refcocog", "umd"): ["train", "val", "test"],
    ("refcocog", "google"): ["train", "val"],
}
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
    """Holds the indexes of one set of COCO images and annotations while the refs are checked one by one."""

    def __init__(self, dataset: str, refs_label: str, images_dir: Path, instances: dict, instances_name: str):
        self.dataset = dataset
        self.refs_label = refs_label  # failure paths: "<refs_label>#ref_id=3"
        self.instances_name = instances_name  # what failures call the file of the images and annotations
        self.images_dir = images_dir
        self.failures: list[Failure] = []
        self.images = {im["id"]: im for im in self._records(instances, "images", "malformed_image_record")}
        self.annotations = {a["id"]: a for a in self._records(instances, "annotations", "malformed_annotation")}
        self.categories = {c["id"]: c.get("name", "")
                           for c in self._records(instances, "categories", "malformed_category")}

    def _records(self, instances: dict, key: str, reason: str) -> list[dict]:
        """The records of one list (images, annotations, categories) that have a usable id; the others are reported.

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
            self.fail(reason, f"entry {index} of '{key}' in {self.instances_name} {problem}", "",
                      path=f"{self.instances_name}#{key}[{index}]")
        return good

    def fail(self, reason: str, detail: str, split: str, ref_id: Any = None, path: str | None = None) -> None:
        where = path if path is not None else f"{self.refs_label}#ref_id={ref_id}"
        self.failures.append(Failure(path=where, reason=reason, detail=detail, split=split))

    def image_path(self, image: dict, split: str) -> str | None:
        """The image file under images_dir, or None (reported) when the record or the file is unusable."""
        file_name = image.get("file_name")
        width, height = image.get("width"), image.get("height")
        if not (is_text(file_name) and _positive_int(width) and _positive_int(height)):
            self.fail("malformed_image_record", f"image {image.get('id')} lacks a file_name or a positive width "
                      f"and height in {self.instances_name}", split,
                      path=f"{self.instances_name}#image_id={image.get('id')}")
            return None
        parts = Path(file_name).parts
        if Path(file_name).is_absolute() or ".." in parts:
            self.fail("unsafe_path", f"file_name {file_name!r} points outside the images folder", split,
                      path=f"{self.instances_name}#image_id={image.get('id')}")
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
            self.fail("missing_annotation", f"ref {ref_id} names ann_id {ref.get('ann_id')}, which {self.instances_name} lacks",
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


def plan_refs(
    refs: list,
    instances: dict,
    images_dir: Path,
    dataset: str,
    split_by: str,
    splits: list[str] | None,
    *,
    refs_label: str,
    refs_name: str,
    instances_name: str,
    card: dict[str, Any],
    failures: list[Failure] | None = None,
) -> SourcePlan:
    """One SampleSpec per (split, image), sorted by key, from refs and the COCO records they point to.

    `refs_label` prefixes each ref's failure path, `refs_name` and `instances_name` name the inputs in
    messages; `card` describes the source (the split counts are added); `failures` are problems the
    caller already found while reading (they count as input: a source whose every item was bad
    still builds, so that failures.jsonl says why nothing was written).
    """
    planner = _Planner(dataset, refs_label, images_dir, instances, instances_name)
    prior = list(failures or [])

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
                         path=f"{refs_label}#index={position}")
            continue
        grouped[(split, ref["image_id"])].append(ref)
    if not in_selection and not any(f.split in selected for f in prior):
        where = f"0 refs in {refs_name}" if not refs else (
            f"{refs_name} has no ref in split {', '.join(selected)} (its refs are in "
            f"{', '.join(sorted(found_splits)) or 'no readable split'})")
        raise UserError(f"no sample could be built: {where}.")

    specs: dict[str, list[SampleSpec]] = {split: [] for split in selected}
    counts = {split: {"images": 0, "refs": 0, "sentences": 0} for split in selected}
    for (split, image_id), image_refs in sorted(grouped.items(), key=lambda item: (item[0][0], sample_key(item[0][1]))):
        image = planner.images.get(image_id)
        if image is None:
            for ref in image_refs:
                planner.fail("missing_image_record", f"ref {ref['ref_id']} names image_id {image_id}, which "
                             f"{instances_name} lacks", split, ref["ref_id"])
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
            "refs_file": refs_label,  # failure paths of the workers
            "sizes_from": instances_name,
            "refs": entries,
        }
        specs[split].append(SampleSpec(key=sample_key(image_id), image_path=path, record=record))
        counts[split]["images"] += 1
        counts[split]["refs"] += len(entries)
        counts[split]["sentences"] += sum(len(e["sentences"]) for e in entries)

    empty = [split for split in selected if not specs[split]]
    notes = [f"split '{split}' has no usable refs; no shards are written for it." for split in empty]
    card = {**card, "dataset": dataset, "split_by": split_by, "splits": {split: counts[split] for split in selected},
            "empty_splits": empty, "notes": notes}
    return SourcePlan(
        kind="refcoco",
        splits={split: specs[split] for split in selected if specs[split]},
        failures=prior + planner.failures,
        card=card,
    )

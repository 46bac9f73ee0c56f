"""Property tests: masks, sample JSON and caption readers hold their contracts on any input.

These extend tests/sgdata/test_sgdata_sources.py (mask -> RLE -> mask and transposes) and
tests/sgdata/test_sgdata_captions.py (caption text through finalize, odd names in folders, keys) with what
they do not cover: resize invariants, the other segmentation forms, junk segmentations, the RefCOCO
sample JSON, caption files of arbitrary bytes, and tables of arbitrary captions, file names and text.
Example counts are kept small so the file runs in seconds; CI can raise them with a hypothesis profile.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask

from sgdata import masks
from sgdata.format import SegmentationError, UserError, mask_to_rle, rle_to_mask
from sgdata.images import fit_size, oriented_size
from sgdata.sources.base import StoredImage
from sgdata.sources.caption_folder import parse_caption_file
from sgdata.sources.captions import plan_captions
from sgdata.sources.refer_sample import dumps_sample, finalize
from tests.helpers.transpose import NUMPY_TRANSPOSE

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SWAPS_AXES = {2, 4, 5, 6}

bool_masks = arrays(np.bool_, st.tuples(st.integers(1, 20), st.integers(1, 20)))
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # any text that UTF-8 can carry


def column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask, computed here without pycocotools: runs over the column-major
    pixels, starting with a (possibly empty) run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


# ---------------------------------------------------------------- RLE masks


@FAST
@given(bool_masks, st.integers(1, 3), st.integers(0, 6))
def test_rle_resize_and_transpose_invariants(mask, factor, op):
    rle = mask_to_rle(mask)
    height, width = mask.shape
    assert mask_to_rle(rle_to_mask(rle)) == rle  # one mask, one encoding
    assert masks.resize_rle(rle, height, width) == rle  # same size: untouched

    up = masks.resize_rle(rle, height * factor, width * factor)
    expected_up = mask.repeat(factor, axis=0).repeat(factor, axis=1)  # nearest, integer factor: pixel blocks
    assert np.array_equal(rle_to_mask(up), expected_up)
    assert np.array_equal(rle_to_mask(masks.resize_rle(up, height, width)), mask)  # and back exactly

    # the build transposes first, then resizes; for integer factors the order does not matter
    turned = masks.transpose_rle(rle, op)
    turned_h, turned_w = (width, height) if op in SWAPS_AXES else (height, width)
    assert rle_to_mask(turned).shape == (turned_h, turned_w)
    assert rle_to_mask(turned).sum() == mask.sum()  # a transpose moves pixels, never adds or drops
    both = masks.resize_rle(turned, turned_h * factor, turned_w * factor)
    assert np.array_equal(rle_to_mask(both), NUMPY_TRANSPOSE[op](expected_up))



def _pillow_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The definition resize_rles follows: the mask as an image, resized with Pillow's NEAREST."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) > 127  # (height, width)


@FAST
@given(st.lists(arrays(np.bool_, st.just((11, 17)), elements=st.booleans()), min_size=1, max_size=4),
       st.integers(1, 40), st.integers(1, 40))
def test_resizing_masks_on_their_runs_matches_pillow_at_any_size(mask_list, height, width):
    rles = masks.resize_rles([mask_to_rle(m) for m in mask_list], height, width)
    for mask, rle in zip(mask_list, rles):
        expected = _pillow_nearest(mask, height, width)
        assert rle == mask_to_rle(expected)  # same pixels and the very string pycocotools encodes


@pytest.mark.parametrize("source, target", [((480, 640), (360, 480)), ((640, 427), (480, 320)),
                                            ((375, 500), (384, 512)), ((427, 640), (213, 320))])
def test_resizing_photo_sized_masks_matches_pillow(source, target):
    rng = np.random.default_rng(sum(source))
    blobs = [rng.random((8, 8)) < p for p in (0.0, 0.3, 0.7, 1.0)]  # coarse blobs, then noise, at full size
    mask_list = [_pillow_nearest(b, *source) for b in blobs] + [rng.random(source) < 0.5]
    mask_list[-2][0, 0] = mask_list[-2][-1, -1] = False  # runs that start and end inside the image too
    rles = masks.resize_rles([mask_to_rle(m) for m in mask_list], *target)
    assert [rle_to_mask(r).shape for r in rles] == [target] * len(mask_list)
    for mask, rle in zip(mask_list, rles):
        assert rle == mask_to_rle(_pillow_nearest(mask, *target))
    uncompressed = {"size": list(source), "counts": column_major_runs(mask_list[1])}
    assert masks.resize_rle(uncompressed, *target) == rles[1]  # crowd-style counts give the same mask

@FAST
@given(bool_masks)
def test_every_segmentation_form_of_a_mask_gives_the_same_mask(mask):
    height, width = mask.shape
    compressed = mask_to_rle(mask)
    assert masks.segmentation_to_rle(compressed, height, width) == compressed
    from_counts = masks.segmentation_to_rle({"size": [height, width], "counts": column_major_runs(mask)}, height, width)
    assert np.array_equal(rle_to_mask(from_counts), mask)
    byte_counts = {"size": [height, width], "counts": compressed["counts"].encode("ascii")}
    assert masks.segmentation_to_rle(byte_counts, height, width) == compressed


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(["size", "counts", "x"]), inner, max_size=3),
    max_leaves=20,
)


@FAST
@given(st.lists(st.lists(st.one_of(st.floats(), st.integers(-5, 40), st.text(max_size=3), st.none()), max_size=10),
                max_size=4))
def test_polygon_junk_gives_a_mask_or_a_segmentation_error(segmentation):
    """Whatever a polygon list holds (NaN, strings, 1-2 points), the answer is a mask or SegmentationError."""
    try:
        rle = masks.segmentation_to_rle(segmentation, 12, 10)
    except SegmentationError:
        assert masks.clean_polygons(segmentation) == []
        return
    assert rle_to_mask(rle).shape == (12, 10)
    assert all(len(part) >= 6 and all(math.isfinite(v) for v in part) for part in masks.clean_polygons(segmentation))


@FAST
@example({"size": [12, 10], "counts": "!!!garbage"})
@example({"size": [12, 10], "counts": ["a", None]})
@example({"size": [12, 10], "counts": [-5, 125]})
@given(json_junk)
def test_any_junk_segmentation_gives_a_decodable_mask_or_a_segmentation_error(segmentation):
    try:
        rle = masks.segmentation_to_rle(segmentation, 12, 10)
    except SegmentationError:
        return
    assert rle_to_mask(rle).shape == (12, 10)


# ---------------------------------------------------------------- RefCOCO sample JSON


@st.composite
def refcoco_samples(draw):
    """A finalize() record (polygons in the raw frame) and the StoredImage the worker would hand it."""
    width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    transpose = draw(st.none() | st.integers(0, 6))
    upright = oriented_size(width, height, transpose)
    stored = fit_size(*upright, draw(st.none() | st.integers(1, 24)))
    coords = st.floats(0, 1, allow_nan=False).map(lambda v: round(v, 3))
    refs = []
    for index in range(draw(st.integers(1, 3))):
        points = draw(st.lists(st.tuples(coords, coords), min_size=3, max_size=6))
        polygon = [v for x, y in points for v in (x * width, y * height)]
        x0, y0 = draw(coords) * width, draw(coords) * height
        bbox = [x0, y0, draw(coords) * (width - x0), draw(coords) * (height - y0)]
        sentences = [{"sent_id": draw(st.integers(0, 10**9)), "text": text}
                     for text in draw(st.lists(texts.filter(str.strip), min_size=1, max_size=3))]
        refs.append({"ref_id": index, "ann_id": draw(st.integers(0, 10**12)), "category_id": draw(st.integers(0, 90)),
                     "category": draw(texts), "bbox": bbox, "sentences": sentences, "segmentation": [polygon]})
    record = {"image_id": draw(st.integers(0, 10**12) | texts), "file_name": draw(texts), "width": width,
              "height": height, "dataset": draw(texts), "split": draw(texts), "refs_file": "refs(x).p", "refs": refs}
    image = StoredImage(b"", stored[0], stored[1], width, height, transpose, False)
    return record, image


@FAST
@given(refcoco_samples())
def test_refcoco_sample_json_parses_back_to_the_same_data(sample):
    record, image = sample
    result = finalize(record, image)
    blob = result.files["json"]
    doc = json.loads(blob.decode("utf-8"))
    assert dumps_sample(doc) == blob  # canonical: parse and write again gives the same bytes
    assert {k: doc[k] for k in ("image_id", "file_name", "dataset", "split")} == {
        k: record[k] for k in ("image_id", "file_name", "dataset", "split")}
    assert (doc["width"], doc["height"]) == (image.width, image.height)
    assert [r["ref_id"] for r in doc["refs"]] == [r["ref_id"] for r in record["refs"]]
    for ref, source in zip(doc["refs"], record["refs"]):
        assert {k: ref[k] for k in ("ann_id", "category_id", "category", "sentences")} == {
            k: source[k] for k in ("ann_id", "category_id", "category", "sentences")}
        assert ref["mask"]["size"] == [image.height, image.width]
        x, y, w, h = ref["bbox"]
        assert -1e-6 <= x and -1e-6 <= y and x + w <= image.width + 1e-6 and y + h <= image.height + 1e-6
        if (image.width, image.height) == oriented_size(record["width"], record["height"], image.transpose):
            raw = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(
                source["segmentation"], record["height"], record["width"]))).astype(bool)  # (H, W)
            turned = raw if image.transpose is None else NUMPY_TRANSPOSE[image.transpose](raw)
            assert np.array_equal(rle_to_mask(ref["mask"]), turned)
    assert result.texts == [s["text"] for r in record["refs"] for s in r["sentences"]]


# ---------------------------------------------------------------- caption files and tables

CAPTION_PROBLEMS = {"oversized_caption", "unreadable_caption", "undecodable_caption", "malformed_caption", "blank_caption"}


def _clean(values: list[str]) -> list[str]:
    kept: list[str] = []
    for value in values:
        if value.strip() and value.strip() not in kept:
            kept.append(value.strip())
    return kept


@FAST
@given(st.sampled_from([".txt", ".json", ".TXT"]), st.one_of(st.binary(max_size=80),
                                                             texts.map(lambda t: t.encode("utf-8"))))
def test_any_caption_file_bytes_give_clean_captions_or_one_named_problem(tmp_path_factory, extension, data):
    path = tmp_path_factory.mktemp("cap") / f"c{extension}"
    path.write_bytes(data)
    captions, problem = parse_caption_file(str(path))
    if problem is not None:
        assert captions == [] and problem[0] in CAPTION_PROBLEMS and problem[1] and "\n" not in problem[1]
        return
    assert captions and captions == _clean(captions)
    for caption in captions:
        caption.encode("utf-8")  # never a lone surrogate: every kept caption can be written to a shard
    if extension.lower() == ".txt":
        assert captions == _clean(data.decode("utf-8-sig").splitlines())


@FAST
@given(st.one_of(texts, st.lists(texts, max_size=4), st.fixed_dictionaries({"caption": texts}),
                 st.fixed_dictionaries({"captions": st.lists(texts, max_size=4)}), st.integers(), st.none(),
                 st.dictionaries(texts, texts, max_size=2)))
def test_caption_json_documents_of_any_shape(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cap") / "c.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    captions, problem = parse_caption_file(str(path))
    if isinstance(document, dict):
        document = document.get("captions", document.get("caption", 0))
    values = [document] if isinstance(document, str) else document
    if isinstance(values, list) and all(isinstance(v, str) for v in values) and _clean(values):
        assert (captions, problem) == (_clean(values), None)
    else:
        assert captions == [] and problem[0] in {"malformed_caption", "blank_caption"}


_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
_file_names = st.text(_name_chars, min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 200)


def _write_table(path: Path, fmt: str, rows: list[tuple[str, str]]) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), path)
    else:  # every field quoted: a bare CR or LF in a caption is then a value, not a line break
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="," if fmt == "csv" else "\t", lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerows([("image", "caption"), *rows])
        path.write_text(buffer.getvalue(), encoding="utf-8")


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    return buffer.getvalue()


@FAST
@given(st.sampled_from(["csv", "tsv", "jsonl", "parquet"]),
       st.lists(st.tuples(_file_names, texts), min_size=1, max_size=4, unique_by=lambda row: row[0].lower()))
def test_tables_keep_any_file_name_and_any_caption(tmp_path_factory, jpeg, fmt, rows):
    root = tmp_path_factory.mktemp("table")
    (root / "img").mkdir()
    table_rows, expected = [], {}
    for name, caption in rows:
        rel = f"img/{name}.jpg"
        (root / rel).write_bytes(jpeg)
        table_rows.append((rel, caption))
        if _clean([caption]):
            expected[rel] = _clean([caption])
    _write_table(root / f"pairs.{fmt}", fmt, table_rows)
    plan = plan_captions(root / f"pairs.{fmt}")
    assert {spec.record["source"]: spec.record["captions"] for spec in plan.splits["train"]} == expected
    assert [f.reason for f in plan.failures] == ["blank_caption"] * (len(rows) - len(expected))
    for spec in plan.splits["train"]:
        json.dumps(spec.record, ensure_ascii=False).encode("utf-8")  # the record can be written as UTF-8 JSON


@FAST
@given(st.sampled_from(["csv", "tsv", "jsonl"]), st.booleans(), st.text(st.characters(blacklist_categories=("Cs",)),
                                                                         max_size=120))
def test_any_text_as_a_table_is_planned_or_refused_in_one_sentence(tmp_path_factory, fmt, with_header, body):
    root = tmp_path_factory.mktemp("table")
    header = {"csv": "image,caption\n", "tsv": "image\tcaption\n", "jsonl": ""}[fmt] if with_header else ""
    path = root / f"t.{fmt}"
    path.write_text(header + body, encoding="utf-8")
    try:
        plan = plan_captions(path)
    except UserError as error:
        assert not set(str(error)) & {"\n", "\r"}  # one line on a terminal (column names are quoted as found)
        return
    assert all(f.reason in {"malformed_row", "missing_image", "missing_caption", "blank_caption", "outside_root",
                            "remote_image", "undecodable_caption"} for f in plan.failures)


@FAST
@example("csv", b"imag\xe9,caption\na.jpg,x\n")
@given(st.sampled_from(["csv", "tsv", "jsonl"]), st.binary(max_size=80))
def test_any_bytes_as_a_table_are_planned_or_refused_in_one_sentence(tmp_path_factory, fmt, data):
    path = tmp_path_factory.mktemp("table") / f"t.{fmt}"
    path.write_bytes(data)
    try:
        plan_captions(path)
    except UserError as error:
        assert not set(str(error)) & {"\n", "\r"}  # one line on a terminal (column names are quoted as found)

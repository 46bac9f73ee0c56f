"""Input checks behind docs/reliability.md's fixed gaps: ids, text, RLE counts, far-away polygons, CSV rows,
failure text that is not UTF-8, one bad sample in a shard, and builds that yield no sample at all.

The per-builder fault matrix is tests/sgdata/test_reliability_bad_input.py; this file covers what that matrix
does not: several faults of one kind at once, the planner's and the writer's mechanisms directly, and
the refusals of empty builds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from sgdata import api, masks
from sgdata.format import SegmentationError, UserError, check_rle, decode_counts, mask_to_rle, rle_to_mask
from sgdata.samples import SampleOptions
from sgdata.sources.captions import plan_captions
from sgdata.writer import ShardTask, write_shard
from tests.helpers.build_checks import (
    GOOD_ROWS, GOOD_TABLE, assert_build_is_whole, assert_reported, expected_refcoco, image_bytes, make_table_root,
    put, read_failures, read_samples, stored_captions, stored_refcoco, write_csv,
)
from tests.helpers.oracles import decode_counts_string
from tests.helpers.refer_fixture import make_refer_fixture


def _build_refcoco(fx: dict, out: Path, **kwargs) -> dict:
    return api.build_refcoco(fx["refer_root"], fx["images_dir"], fx["dataset"], fx["split_by"], out,
                             workers=0, shard_size=2, **kwargs)


# ---------------------------------------------------------------- ids and text in the refer files


def test_ids_and_text_that_cannot_be_keys_or_json_are_reported_where_they_are(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    instances = copy.deepcopy(fx["instances"])
    n_images, n_annotations, n_categories = (len(instances[k]) for k in ("images", "annotations", "categories"))
    instances["images"].append({"id": [1], "file_name": "x.jpg", "width": 4, "height": 4})
    instances["annotations"].append({"id": {"a": 1}, "image_id": 391895, "segmentation": [], "bbox": [0, 0, 1, 1]})
    instances["categories"] += [{"id": [2], "name": "thing"}, {"id": 99, "name": "bad \ud800 name"}]
    fx["instances_path"].write_text(json.dumps(instances), encoding="utf-8")  # "\ud800" as a JSON escape

    refs = copy.deepcopy(fx["refs"])
    kept_sentences = next(r for r in refs if len(r["sentences"]) >= 2)
    changes = {"image_id": [391895], "category_id": [1], "ref_id": math.nan, "split": "../up"}
    victims = [r for r in refs if r is not kept_sentences][:len(changes)]
    for victim, (key, value) in zip(victims, changes.items()):
        victim[key] = value
    expected_refs = [copy.deepcopy(r) for r in refs if not any(r is v for v in victims)]
    kept_sentences["sentences"].append({"sent_id": {1, 2}, "sent": "an id that is a set", "raw": ""})
    fx["refs_path"].write_bytes(pickle.dumps(refs, protocol=4))  # protocol 4 stores sets without a global
    fx["refs"] = expected_refs

    out = tmp_path / "out"
    summary = _build_refcoco(fx, out)
    failures = read_failures(out)
    index = {id(r): i for i, r in enumerate(refs)}
    assert_reported(failures, [
        ("malformed_image_record", f"instances.json#images[{n_images}]"),
        ("malformed_annotation", f"instances.json#annotations[{n_annotations}]"),
        ("malformed_category", f"instances.json#categories[{n_categories}]"),
        ("malformed_category", f"instances.json#categories[{n_categories + 1}]"),
        *[("malformed_ref", f"#index={index[id(v)]}") for v in victims],
        ("blank_sentence", f"#ref_id={kept_sentences['ref_id']}"),
    ])
    by_path = {f["path"].rsplit("#", 1)[-1]: f for f in failures}
    for victim in victims[:3]:  # a malformed ref whose split can be read is reported under it
        assert by_path[f"index={index[id(victim)]}"]["split"] == victim["split"]
    assert by_path[f"index={index[id(victims[3])]}"]["split"] == ""  # "../up" is no split name
    assert_build_is_whole(out, summary, failures)
    assert stored_refcoco(out) == expected_refcoco(fx, set())
    assert not (tmp_path / "up").exists()  # out / "../up" was never made a split folder

    card = json.loads((out / "dataset.json").read_text())
    assert card["failures_by_split"] == dict(Counter(f["split"] for f in failures))
    assert card["failures_by_split"][""] == 5
    for split in card["splits"]:
        assert card["failures_by_split"].get(split, 0) == json.loads((out / split / "stats.json").read_text())["failures"]


def test_a_ref_keeps_a_good_raw_text_when_its_sent_is_undecodable(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    refs = copy.deepcopy(fx["refs"])
    refs[0]["sentences"] = [{"sent_id": 7, "sent": "broken \udc80 tokens", "raw": "The raw words"}]
    fx["refs_path"].write_bytes(pickle.dumps(refs, protocol=4))
    out = tmp_path / "out"
    _build_refcoco(fx, out)
    assert read_failures(out) == []
    texts = {ref_id: t for split in stored_refcoco(out).values() for sample in split.values() for ref_id, t in sample.items()}
    assert texts[refs[0]["ref_id"]] == ["The raw words"]


# ---------------------------------------------------------------- masks


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_compressed_counts_are_read_as_pycocotools_writes_them(mask):
    runs = decode_counts(mask_to_rle(mask)["counts"])
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)  # runs alternate 0, 1, 0, ... column-major
    assert np.array_equal(flat.reshape(mask.shape, order="F"), mask)


# characters that end a run ("0", "1", "?", "O"), continue one ("P", "`", "o"), carry the sign ("@"), and
# that are no group at all (" ", "p", "é", "/")
COUNTS_CHARACTERS = "01?OP`o@ pé/"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=COUNTS_CHARACTERS, max_size=40) | st.binary(max_size=16)
       | st.builds(lambda n, tail: "P" * n + tail, st.integers(0, 30), st.text(alphabet=COUNTS_CHARACTERS, max_size=4)))
def test_the_counts_reader_agrees_with_the_one_character_reference(counts):
    """Same runs, or the same first fault in reading order (a 13-group run says "64 bits" before a string
    ending mid-run does; non-ASCII bytes say "not ASCII"; a bad character is named)."""
    try:
        expected = decode_counts_string(counts)
    except SegmentationError as exc:
        with pytest.raises(SegmentationError) as raised:
            decode_counts(counts)
        assert str(raised.value) == str(exc)
        return
    if all(-(1 << 63) <= run < 1 << 63 for run in expected):
        assert decode_counts(counts).tolist() == expected
    else:  # runs past 64 bits (pycocotools could not hold them either)
        with pytest.raises(SegmentationError, match="64 bits"):
            decode_counts(counts)


@pytest.mark.parametrize("counts, message", [
    ("!!!garbage", "not a run-length character"), ("o", "middle of a run"), ("P" * 20, "64 bits"),
    ("1111", "sum to 5"), (b"\xff", "not ASCII"), ([60, 59], "sum to 119"), ([-5, 125], "negative"),
    ([1.5, 118.5], "whole numbers"), ([True, 119], "whole numbers"), ({"a": 1}, "not understood"),
])
def test_rle_counts_that_do_not_describe_the_mask_are_segmentation_errors(counts, message):
    with pytest.raises(SegmentationError, match=message):
        masks.segmentation_to_rle({"size": [12, 10], "counts": counts}, 12, 10)
    with pytest.raises(SegmentationError):
        check_rle({"size": [12, 10], "counts": counts}, 12, 10)


def test_far_away_polygons_are_clipped_instead_of_crashing_the_rasteriser():
    """pycocotools allocates along the outline: a corner at 1e300 crashed the process; now the part is clipped."""
    far = rle_to_mask(masks.segmentation_to_rle([[0.0, 0.0, 1e300, 0.0, 0.0, 1e300]], 12, 10))
    near = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([[0.0, 0.0, 1e3, 0.0, 0.0, 1e3]], 12, 10))).astype(bool)
    assert np.array_equal(far, near) and far.sum() > 100
    outside = masks.segmentation_to_rle([[1e9, 1e9, 2e9, 1e9, 2e9, 2e9]], 12, 10)
    assert not rle_to_mask(outside).any()  # wholly outside: an empty mask, as pycocotools would give
    inside = [[2.0, 2.0, 8.5, 2.0, 8.5, 11.0, 2.0, 10.0]]  # real data is never clipped: same bytes as pycocotools
    assert masks.segmentation_to_rle(inside, 12, 10)["counts"] == \
        coco_mask.merge(coco_mask.frPyObjects(inside, 12, 10))["counts"].decode()
    zigzag = [[float(v) for i in range(40000) for v in ((0, 0) if i % 2 else (999, 999))]]
    with pytest.raises(SegmentationError, match="outline"):
        masks.segmentation_to_rle(zigzag, 1000, 1000)


# ---------------------------------------------------------------- the writer: one bad sample, failure text


def _caption_plan(tmp_path: Path):
    root = tmp_path / "corpus"
    for name in ("a", "b", "c"):
        put(root / f"{name}.jpg", image_bytes(10, 8))
        put(root / f"{name}.txt", f"caption {name}")
    return plan_captions(root).splits["train"]


def test_an_unexpected_error_in_one_sample_costs_that_sample_only(tmp_path):
    specs = _caption_plan(tmp_path)
    specs[1].record["captions"] = ["a lone \ud800 surrogate that planning did not catch"]
    part = write_shard(ShardTask("train", 0, specs, str(tmp_path / "out"), "captions", SampleOptions()))
    assert [row["key"] for row in part["rows"]] == [specs[0].key, specs[2].key]
    assert [(f["path"], f["reason"]) for f in part["failures"]] == [(specs[1].image_path, "sample_error")]
    detail = part["failures"][0]["detail"]
    assert detail.startswith("UnicodeEncodeError: ") and "\n" not in detail


def test_an_environment_error_still_fails_the_shard_so_it_is_retried(tmp_path, monkeypatch):
    import sgdata.samples

    def storage_gone(kind, spec, options):
        raise OSError("network storage went away")

    monkeypatch.setattr(sgdata.samples, "make_sample", storage_gone)
    with pytest.raises(OSError, match="storage"):
        write_shard(ShardTask("train", 0, _caption_plan(tmp_path), str(tmp_path / "out"), "captions", SampleOptions()))
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_a_failure_naming_a_file_that_is_not_utf8_is_written(tmp_path):
    root = tmp_path / "corpus"
    put(root / "good.jpg", image_bytes())
    put(root / "good.txt", "a good one")
    raw = os.fsencode(root)
    Path(os.fsdecode(raw + b"/caf\xe9.jpg")).write_bytes(b"")  # an empty image under a latin-1 name
    Path(os.fsdecode(raw + b"/caf\xe9.txt")).write_text("its caption")
    out = tmp_path / "out"
    summary = api.build_captions(root, out, workers=0)
    failures = read_failures(out)
    assert summary["failed_shards"] == [] and [f["reason"] for f in failures] == ["unreadable_image"]
    assert os.fsencode(failures[0]["path"]).endswith(b"caf\xe9.jpg")  # read back, it names the very file
    assert stored_captions(out) == {"good.jpg": ["a good one"]}


# ---------------------------------------------------------------- CSV tables


def test_csv_rows_are_labelled_with_the_line_they_start_on(tmp_path):
    root = tmp_path / "table"
    make_table_root(root)
    path = write_csv(root / "pairs.csv", GOOD_ROWS + [("three.jpg", "two\nlines")])
    data = b"\xef\xbb\xbf" + path.read_bytes() + b"\nimg/one.jpg,x,y\nthree.jpg,caf\xe9,too,many\n"
    path.write_bytes(data)  # a byte order mark, a quoted line break, a blank line, two ragged rows
    plan = plan_captions(path)
    first_ragged = len(GOOD_ROWS) + 2 + 2 + 1  # header, the rows, the two-line row, the blank line
    assert [(f.path, f.reason) for f in plan.failures] == [
        (f"pairs.csv:{first_ragged}", "malformed_row"), (f"pairs.csv:{first_ragged + 1}", "malformed_row")]
    assert "3 fields, expected 2" in plan.failures[0].detail and "\\xe9" in plan.failures[1].detail
    captions = {spec.record["source"]: spec.record["captions"] for spec in plan.splits["train"]}
    assert captions == {**GOOD_TABLE, "three.jpg": GOOD_TABLE["three.jpg"] + ["two\nlines"]}


@pytest.mark.parametrize("data, message", [
    (b"imag\xe9,caption\nthree.jpg,x\n", "the header (first line) of the table pairs.csv is not UTF-8 text"),
    (b"", "the table pairs.csv is empty"),
    (b"\n\n", "the table pairs.csv is empty"),
    (b"image,caption\n", "no sample could be built: the table pairs.csv has no rows."),
    (b"image,\"words\nmore\"\nthree.jpg,x\n", "found image, 'words\\nmore'"),
])
def test_unusable_csv_tables_are_one_sentence(tmp_path, data, message):
    path = put(tmp_path / "pairs.csv", data)
    with pytest.raises(UserError) as caught:
        plan_captions(path)
    text = str(caught.value)
    assert message in text and not set(text) & {"\n", "\r"} and text.endswith(".") and not text.endswith("..")


def test_an_unreadable_parquet_file_is_one_sentence_with_one_period(tmp_path):
    with pytest.raises(UserError) as caught:
        plan_captions(put(tmp_path / "pairs.parquet", b"PAR1 this is not parquet"))
    assert str(caught.value).startswith("cannot read the table pairs.parquet: ") and str(caught.value)[-2:] != ".."


# ---------------------------------------------------------------- builds with no sample at all


def test_a_refs_file_without_refs_is_refused_before_out_is_created(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    fx["refs_path"].write_bytes(pickle.dumps([], protocol=2))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^no sample could be built: 0 refs in refs\(unc\)\.p\.$"):
        _build_refcoco(fx, out)
    assert not out.exists()


def test_selected_splits_without_refs_are_refused_and_an_empty_split_beside_others_is_a_note(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    fx["refs_path"].write_bytes(pickle.dumps([r for r in fx["refs"] if r["split"] != "testB"], protocol=2))
    with pytest.raises(UserError) as caught:
        _build_refcoco(fx, tmp_path / "out", splits="testB")
    assert "has no ref in split testB (its refs are in testA, train, val)" in str(caught.value)
    assert not (tmp_path / "out").exists()
    _build_refcoco(fx, tmp_path / "out", splits="testA,testB")  # testA has refs: testB is only noted
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["source"]["empty_splits"] == ["testB"]


def test_refs_all_dropped_while_planning_are_listed_then_the_build_fails(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    refs = [{**ref, "ann_id": 123_456_789} for ref in fx["refs"]]
    fx["refs_path"].write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        _build_refcoco(fx, out)
    assert str(caught.value) == (f"no sample could be built: every item was skipped ({len(refs)} failures: "
                                 f"missing_annotation {len(refs)}); see {out / 'failures.jsonl'}.")
    failures = read_failures(out)
    assert_reported(failures, [("missing_annotation", f"#ref_id={ref['ref_id']}") for ref in refs])
    assert json.loads((out / "dataset.json").read_text())["failures"] == len(refs) and read_samples(out) == {}


def test_cli_exits_2_with_one_line_when_no_sample_can_be_built(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    fx["refs_path"].write_bytes(pickle.dumps([], protocol=2))
    done = subprocess.run(
        [sys.executable, "-m", "sgdata", "build", "refcoco", "--refer-root", str(fx["refer_root"]), "--images",
         str(fx["images_dir"]), "--dataset", "refcoco", "--split-by", "unc", "--out", str(tmp_path / "out"),
         "--workers", "0"], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["sgdata: no sample could be built: 0 refs in refs(unc).p."]
    assert "Traceback" not in done.stdout + done.stderr

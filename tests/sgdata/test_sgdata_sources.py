"""sgdata sources, images, masks and the refs reader: what goes in comes out, bad input is named."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask

from sgdata import masks
from sgdata.format import SampleError, SegmentationError, UserError, decode_rgb, mask_to_rle, rle_to_mask
from sgdata.images import load_image
from sgdata.refer import load_instances, load_refs
from sgdata.samples import SampleOptions, make_sample
from sgdata.sources.refcoco import finalize, plan_refcoco
from tests.helpers.refer_fixture import FAULT_KINDS, make_refer_fixture
from tests.helpers.transpose import NUMPY_TRANSPOSE


# ----------------------------------------------------------------------------- helpers (independent of sgdata)

def source_mask(segmentation, height: int, width: int) -> np.ndarray:
    """pycocotools' own decoding of a COCO segmentation (polygon parts merged, as annToRLE)."""
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    else:
        rle = coco_mask.frPyObjects(segmentation, height, width)
    return coco_mask.decode(rle).astype(bool)  # (H, W)


def nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest neighbour by pixel centres."""
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)
    return mask[rows][:, cols]




def expected_text(sentence: dict) -> str:
    return sentence["sent"] if sentence["sent"].strip() else sentence["raw"]


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


def build_samples(fixture: dict, options: SampleOptions, splits=None) -> list[dict]:
    plan = plan_refcoco(fixture["refer_root"], fixture["images_dir"], fixture["dataset"], fixture["split_by"], splits)
    out = []
    for specs in plan.splits.values():
        for spec in specs:
            made = make_sample("refcoco", spec, options)
            out.append({"spec": spec, "made": made, "json": json.loads(made.files["json"].decode("utf-8"))})
    return out


# ----------------------------------------------------------------------------- refcoco round trip

@pytest.mark.parametrize("max_size", [None, 32])
def test_every_sentence_and_mask_round_trips(refer, max_size):
    samples = build_samples(refer, SampleOptions(max_size=max_size))
    annotations = {a["id"]: a for a in refer["instances"]["annotations"]}
    images = {i["id"]: i for i in refer["instances"]["images"]}
    source_refs = {r["ref_id"]: r for r in refer["refs"]}

    seen_sentences, checked_masks = set(), 0
    for sample in samples:
        doc, jpg = sample["json"], sample["made"].files["jpg"]
        stored = decode_rgb(jpg)
        assert (doc["width"], doc["height"]) == stored.size
        if max_size is not None:
            assert max(stored.size) <= max_size
        record = images[doc["image_id"]]
        for ref in doc["refs"]:
            source = source_refs[ref["ref_id"]]
            assert ref["ann_id"] == source["ann_id"] and ref["category_id"] == source["category_id"]
            for sentence in ref["sentences"]:
                seen_sentences.add((ref["ref_id"], sentence["sent_id"], sentence["text"]))
            annotation = annotations[ref["ann_id"]]
            expected = source_mask(annotation["segmentation"], record["height"], record["width"])
            if doc["image_id"] == refer["exif_image_id"]:
                expected = NUMPY_TRANSPOSE[int(Image.Transpose.ROTATE_270)](expected)  # EXIF orientation 6
            if expected.shape != (doc["height"], doc["width"]):
                expected = nearest_resize(expected, doc["height"], doc["width"])
            assert ref["mask"]["size"] == [doc["height"], doc["width"]]
            assert np.array_equal(rle_to_mask(ref["mask"]), expected), (doc["image_id"], ref["ref_id"])
            checked_masks += 1
            if max_size is None and doc["image_id"] != refer["exif_image_id"]:
                assert ref["bbox"] == [float(v) for v in annotation["bbox"]]
    expected_sentences = {(r["ref_id"], s["sent_id"], expected_text(s)) for r in refer["refs"] for s in r["sentences"]}
    assert seen_sentences == expected_sentences
    assert checked_masks == len(refer["refs"])


def test_samples_are_grouped_per_image_with_stable_keys_and_one_schema(refer):
    samples = build_samples(refer, SampleOptions())
    keys = [s["spec"].key for s in samples]
    assert len(keys) == len({i["id"] for i in refer["instances"]["images"]})
    assert all("." not in key and key.startswith("img") for key in keys)
    assert "img000000391895" in keys

    def schema(value):
        if isinstance(value, dict):
            return {k: schema(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [schema(value[0])] if value else []
        return type(value).__name__

    shapes = {json.dumps(schema(s["json"]), sort_keys=True) for s in samples}
    assert len(shapes) == 1, shapes
    again = build_samples(refer, SampleOptions())
    assert [s["made"].files for s in again] == [s["made"].files for s in samples]
    assert [s["made"].texts for s in samples] == [
        [t["text"] for ref in s["json"]["refs"] for t in ref["sentences"]] for s in samples
    ]


def test_exif_oriented_box_follows_the_pixels(refer):
    (sample,) = [s for s in build_samples(refer, SampleOptions()) if s["json"]["image_id"] == refer["exif_image_id"]]
    for ref in sample["json"]["refs"]:
        x, y, w, h = ref["bbox"]
        ys, xs = np.nonzero(rle_to_mask(ref["mask"]))
        # the rasterised mask lies inside the transformed box (1 px slack for rasterisation)
        assert xs.min() >= x - 1 and xs.max() <= x + w + 1 and ys.min() >= y - 1 and ys.max() <= y + h + 1


def test_split_selection_and_generic_dataset(tmp_path):
    fixture = make_refer_fixture(tmp_path, dataset="synthref", split_by="synth", splits=("train", "val"))
    plan = plan_refcoco(fixture["refer_root"], fixture["images_dir"], "synthref", "synth", ["val"])
    assert list(plan.splits) == ["val"] and plan.kind == "refcoco"
    assert all(spec.record["split"] == "val" for spec in plan.splits["val"])
    with pytest.raises(UserError, match="split 'testA' is not in synthref"):
        plan_refcoco(fixture["refer_root"], fixture["images_dir"], "synthref", "synth", ["testA"])


def test_empty_split_is_noted_in_the_card(tmp_path):
    fixture = make_refer_fixture(tmp_path)
    kept = [r for r in fixture["refs"] if r["split"] != "testB"]
    fixture["refs_path"].write_bytes(pickle.dumps(kept, protocol=2))
    plan = plan_refcoco(fixture["refer_root"], fixture["images_dir"], "refcoco", "unc")
    assert "testB" not in plan.splits and plan.card["empty_splits"] == ["testB"]
    assert any("testB" in note for note in plan.card["notes"])


# ----------------------------------------------------------------------------- per-item faults and fatal errors

def test_each_per_item_fault_is_reported_and_good_refs_are_kept(tmp_path):
    fixture = make_refer_fixture(tmp_path, faults=FAULT_KINDS)
    plan = plan_refcoco(fixture["refer_root"], fixture["images_dir"], "refcoco", "unc")
    reasons = {f.reason: f for f in plan.failures}
    faults = fixture["faults"]
    for reason in ("missing_annotation", "degenerate_polygon", "missing_image_record", "no_sentences"):
        assert reasons[reason].path.endswith(f"#ref_id={faults[reason]}"), reason
    missing = [f for f in plan.failures if f.reason == "missing_image_file"]
    assert len(missing) == 1 and missing[0].path.endswith(f"{faults['missing_image']:012d}.jpg")
    lost_with_image = {r["ref_id"] for r in fixture["refs"] if r["image_id"] == faults["missing_image"]}
    assert {f.path.rsplit("=", 1)[1] for f in plan.failures if f.reason == "image_unavailable"} == {
        str(i) for i in lost_with_image}

    # every good ref is in the plan; every bad one is not
    planned = {e["ref_id"] for specs in plan.splits.values() for spec in specs for e in spec.record["refs"]}
    bad = {faults[k] for k in ("missing_annotation", "degenerate_polygon", "missing_image_record", "no_sentences")}
    assert planned == {r["ref_id"] for r in fixture["refs"]} - bad - lost_with_image
    first_image = [s for s in plan.splits["train"] if s.key == "img000000391895"][0]
    assert len(first_image.record["refs"]) == 3  # its other refs survive the degenerate polygon


def test_size_mismatch_is_a_sample_error(tmp_path):
    fixture = make_refer_fixture(tmp_path)
    plan = plan_refcoco(fixture["refer_root"], fixture["images_dir"], "refcoco", "unc", ["val"])
    spec = plan.splits["val"][0]
    spec.record["width"] += 3
    with pytest.raises(SampleError) as caught:
        make_sample("refcoco", spec, SampleOptions())
    assert caught.value.reason == "size_mismatch"


def test_fatal_layout_problems_are_one_sentence_user_errors(tmp_path):
    fixture = make_refer_fixture(tmp_path)
    root, images = fixture["refer_root"], fixture["images_dir"]
    cases = [
        ((tmp_path / "nope", images, "refcoco", "unc"), "refer root"),
        ((root, images, "refcocog", "umd"), "dataset folder"),
        ((root, images, "refcoco", "umd"), "refcoco has no splitBy 'umd'"),
        ((root, tmp_path / "no_images", "refcoco", "unc"), "images folder"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            plan_refcoco(*args)
        assert "\n" not in str(caught.value)
    (root / "refcocog").mkdir()
    with pytest.raises(UserError, match="refcocog has no splitBy 'unc'"):
        plan_refcoco(root, images, "refcocog", "unc")
    with pytest.raises(UserError, match=r"refs file .*refs\(google\)\.p does not exist"):
        plan_refcoco(root, images, "refcocog", "google")
    with pytest.raises(UserError, match="split 'test' is not in refcoco"):
        plan_refcoco(root, images, "refcoco", "unc", ["test"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"annotations": []}', "no 'images' list"),
    ('{"images": [], "annotations": {}}', "no 'annotations' list"),
    ("[1, 2]", "holds a JSON list"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
])
def test_malformed_instances_json_is_refused(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message):
        load_instances(path)
    with pytest.raises(UserError, match="does not exist"):
        load_instances(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- the refs pickle

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _RunsCode(marker)], protocol=2))
    with pytest.raises(UserError, match=r"asks to load (posix|nt|os)\.system; refusing to run code") as caught:
        load_refs(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()


def test_python2_pickle_with_byte_strings_loads(tmp_path):
    # Protocol 2 as Python 2 writes it: SHORT_BINSTRING (py2 str) keys and values, one latin-1, one UTF-8.
    blob = (b"\x80\x02]q\x00(}q\x01(U\x04sentq\x02U\x04caf\xe9U\x03rawU\x05caf\xc3\xa9"
            b"U\x06ref_idK\x07X\x04\x00\x00\x00nameX\x02\x00\x00\x00\xc3\xa9ue.")
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(blob)  # what a plain Python-3 load does with it
    path = tmp_path / "refs(unc).p"
    path.write_bytes(blob)
    assert load_refs(path) == [{"sent": "café", "raw": "café", "ref_id": 7, "name": "é"}]


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable pickle"),
    (b"this is text", "not a readable pickle"),
    (pickle.dumps({"a": 1}, protocol=2), "holds a dict"),
    (pickle.dumps([{"a": 1}] * 3, protocol=2)[:-5], "not a readable pickle"),
])
def test_unreadable_refs_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_refs(path)


# ----------------------------------------------------------------------------- masks

def test_rle_helpers_round_trip_and_match_numpy_transposes():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 21)) > 0.6  # (H, W)
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [13, 21]
    assert np.array_equal(rle_to_mask(rle), mask)
    for op, numpy_op in NUMPY_TRANSPOSE.items():
        assert np.array_equal(rle_to_mask(masks.transpose_rle(rle, op)), numpy_op(mask)), op
    for height, width in ((7, 9), (26, 42), (13, 21)):
        assert np.array_equal(rle_to_mask(masks.resize_rle(rle, height, width)), nearest_resize(mask, height, width))


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))), st.integers(0, 6))
def test_rle_round_trip_property(mask, op):
    rle = mask_to_rle(mask)
    assert np.array_equal(rle_to_mask(rle), mask)
    assert np.array_equal(rle_to_mask(masks.transpose_rle(rle, op)), NUMPY_TRANSPOSE[op](mask))
    assert json.loads(json.dumps(rle)) == rle


def test_segmentation_forms_and_degenerate_parts():
    polygon = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0], [12.0, 1.0, 18.0, 1.0, 18.0, 9.0, 12.0, 9.0]]
    expected = source_mask(polygon, 12, 20)
    assert np.array_equal(rle_to_mask(masks.segmentation_to_rle(polygon, 12, 20)), expected)
    # degenerate parts (2 points, 1 point) are ignored rather than read as boxes
    noisy = polygon + [[0.0, 0.0, 19.0, 11.0], [5.0, 5.0]]
    assert masks.clean_polygons(noisy) == polygon
    assert np.array_equal(rle_to_mask(masks.segmentation_to_rle(noisy, 12, 20)), expected)
    with pytest.raises(SegmentationError):
        masks.segmentation_to_rle([[1.0, 1.0, 5.0, 5.0]], 12, 20)
    compressed = mask_to_rle(expected)
    uncompressed_counts = coco_mask.frPyObjects({"size": [12, 20], "counts": [5, 7, 228]}, 12, 20)
    assert masks.segmentation_to_rle(compressed, 12, 20) == compressed
    assert masks.segmentation_to_rle({"size": [12, 20], "counts": [5, 7, 228]}, 12, 20)["counts"] == \
        uncompressed_counts["counts"].decode()
    with pytest.raises(SegmentationError, match="sum"):
        masks.segmentation_to_rle({"size": [12, 20], "counts": [5, 7]}, 12, 20)
    with pytest.raises(SegmentationError, match="size"):
        masks.segmentation_to_rle(compressed, 20, 12)


# ----------------------------------------------------------------------------- images

def _textured(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 5 % 256], axis=-1).astype(np.uint8)  # (H, W, 3)


def _save(path: Path, image: Image.Image, fmt: str, **kwargs) -> Path:
    image.save(path, format=fmt, **kwargs)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_rgb_jpeg_passes_through_byte_identical(tmp_path):
    path = _save(tmp_path / "a.jpg", Image.fromarray(_textured(40, 30)), "JPEG", quality=90)
    stored = load_image(path)
    assert stored.passthrough and stored.data == path.read_bytes()
    assert (stored.width, stored.height, stored.transpose) == (40, 30, None)


def test_resize_keeps_aspect_and_is_deterministic(tmp_path):
    path = _save(tmp_path / "a.jpg", Image.fromarray(_textured(80, 50)), "JPEG", quality=90)
    first, second = load_image(path, max_size=32), load_image(path, max_size=32)
    assert not first.passthrough and first.data == second.data
    assert (first.width, first.height) == (32, 20) == decode_rgb(first.data).size
    assert (first.source_width, first.source_height) == (80, 50)
    assert load_image(path, max_size=100).passthrough  # already small enough: untouched


def test_exif_orientation_is_applied(tmp_path):
    pixels = _textured(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rot.jpg", Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    stored = load_image(path)
    assert stored.transpose == int(Image.Transpose.ROTATE_270) and not stored.passthrough
    assert (stored.width, stored.height, stored.source_width, stored.source_height) == (20, 30, 30, 20)
    upright = np.rot90(pixels, -1).astype(int)
    assert np.abs(np.asarray(decode_rgb(stored.data), dtype=int) - upright).mean() < 8


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(_textured(24, 16))
    if mode == "RGBA":
        alpha = np.full((16, 24), 255, np.uint8)
        alpha[:, :8] = 0  # left third transparent -> white
        image, fmt = Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA"), "PNG"
    elif mode == "P":
        image, fmt = rgb.convert("P"), "PNG"
        image.info["transparency"] = image.getpixel((0, 0))
    elif mode == "I;16":
        image, fmt = Image.fromarray(np.full((16, 24), 65535 // 2, np.uint16)), "PNG"
    else:
        image, fmt = rgb.convert(mode), "JPEG"
    path = _save(tmp_path / f"img.{fmt.lower()}", image, fmt)
    stored = load_image(path)
    decoded = decode_rgb(stored.data)
    assert Image.open(io.BytesIO(stored.data)).format == "JPEG" and Image.open(io.BytesIO(stored.data)).mode == "RGB"
    assert decoded.size == (24, 16) and not stored.passthrough
    out = np.asarray(decoded, dtype=int)
    if mode == "RGBA":
        assert out[:, :6].min() > 240  # composited on white
        assert np.abs(out[:, 10:] - np.asarray(rgb, dtype=int)[:, 10:]).mean() < 10
    elif mode == "I;16":
        assert abs(out.mean() - 127) < 3  # scaled, not clipped to white
    elif mode == "L":
        assert np.abs(out[..., 0] - out[..., 2]).max() <= 2
    elif mode == "CMYK":
        assert np.abs(out - np.asarray(rgb.convert("CMYK").convert("RGB"), dtype=int)).mean() < 10
    small = load_image(path, max_size=12)
    assert (small.width, small.height) == (12, 8) == decode_rgb(small.data).size


def test_png_with_jpg_extension_is_read(tmp_path):
    path = _save(tmp_path / "photo.jpg", Image.fromarray(_textured(20, 10)), "PNG")
    stored = load_image(path)
    assert not stored.passthrough and decode_rgb(stored.data).size == (20, 10)
    assert np.abs(np.asarray(decode_rgb(stored.data), dtype=int) - _textured(20, 10).astype(int)).mean() < 6


def test_one_pixel_image(tmp_path):
    path = _save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    stored = load_image(path, max_size=8)
    assert (stored.width, stored.height) == (1, 1)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # 9000 x 9000 = 81 M pixels: above our default limit, below Pillow's own; no pixel data, so a
    # loader that decoded first would report "unreadable", not "too large".
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(9000, 9000))
    with pytest.raises(SampleError) as caught:
        load_image(path)
    assert caught.value.reason == "image_too_large" and "81000000" in caught.value.detail
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(60000, 60000))  # above Pillow's own bomb limit too
    with pytest.raises(SampleError, match="image_too_large"):
        load_image(huge)
    small = _save(tmp_path / "small.jpg", Image.fromarray(_textured(40, 30)), "JPEG")
    with pytest.raises(SampleError, match="image_too_large"):
        load_image(small, max_pixels=1000)


@pytest.mark.parametrize("kind", ["zero", "truncated", "text", "missing", "directory", "header_only"])
def test_unusable_files_are_sample_errors(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    good = io.BytesIO()
    Image.fromarray(_textured(64, 64)).save(good, format="JPEG", quality=90)
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "header_only":
        path.write_bytes(_png_header_only(10, 10))
    with pytest.raises(SampleError) as caught:
        load_image(path)
    assert caught.value.reason == ("missing_image_file" if kind == "missing" else "unreadable_image")
    assert str(path) in caught.value.detail


def test_make_sample_rejects_unknown_kind(refer):
    plan = plan_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", ["val"])
    with pytest.raises(ValueError, match="unknown source kind"):
        make_sample("nope", plan.splits["val"][0], SampleOptions())
    made = make_sample("refcoco", plan.splits["val"][0], SampleOptions())
    assert list(made.files) == ["jpg", "json"]
    assert finalize(plan.splits["val"][0].record, load_image(plan.splits["val"][0].image_path)).files == {
        "json": made.files["json"]}

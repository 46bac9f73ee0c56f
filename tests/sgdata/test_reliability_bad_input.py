"""Bad input through the real builds: each per-item fault is skipped and reported, no good item is lost.

Every case starts from a clean corpus, injects one fault, builds with `workers=0` and checks the whole
outcome, not only the planner's: no shard failed; failures.jsonl holds exactly the expected
(reason, path) entries; stats.json and dataset.json count the same failures; the shards hold exactly
the good items (every usable ref of every good image for RefCOCO; every good image with its captions
for caption corpora), agree with the manifest, and pass verify. Fatal problems stop the build before
OUT is created, with one sentence (and, from the command line, exit status 2 and no traceback).
docs/reliability.md lists these cases row by row.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image, ImageFile

from sgdata import api
from sgdata.format import SampleError, UserError
from sgdata.images import load_image
from tests.helpers.build_checks import (
    Expected, GOOD_ROWS, GOOD_TABLE, assert_build_is_whole, assert_reported, expected_refcoco, image_bytes,
    make_table_root, put, read_failures, read_samples, stored_captions, stored_refcoco, write_csv,
)
from tests.helpers.refer_fixture import coco_file_name, make_refer_fixture

DEFAULT_MAX_PIXELS = 80_000_000  # sgdata.samples.SampleOptions' default; the bomb below is just above it


# ---------------------------------------------------------------- image bytes


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@lru_cache(maxsize=4)
def png_of_zeros(width: int, height: int) -> bytes:
    """A valid, fully decodable greyscale PNG: tiny on disk, width*height bytes once decoded (a real bomb)."""
    deflate = zlib.compressobj(1)
    row = b"\x00" * (width + 1)  # filter byte + one zero byte per pixel
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def bomb_bytes() -> bytes:
    """9000 x 9000 = 81 M pixels: above sgdata's default limit, below Pillow's own warning-only threshold x2."""
    return png_of_zeros(9000, 9000)


BAD_IMAGE_BYTES: dict[str, Callable[[], bytes]] = {
    "truncated": lambda: image_bytes(64, 48)[: len(image_bytes(64, 48)) // 2],
    "zero_byte": lambda: b"",
    "not_an_image": lambda: b"<html>a web page saved as .jpg</html>\n",
    "decompression_bomb": bomb_bytes,
}
BAD_IMAGE_REASON = {"truncated": "unreadable_image", "zero_byte": "unreadable_image",
                    "not_an_image": "unreadable_image", "decompression_bomb": "image_too_large"}


# ---------------------------------------------------------------- RefCOCO cases

TRAIN_IMAGE = 522418  # a train image of the fixture with 4 refs (one a crowd RLE)
VAL_IMAGE = 184613


def _write_instances(fx: dict, instances: dict) -> None:
    fx["instances"] = instances
    fx["instances_path"].write_text(json.dumps(instances), encoding="utf-8")


def _write_refs(fx: dict, refs: list, protocol: int = 2) -> None:
    fx["refs"] = refs
    fx["refs_path"].write_bytes(pickle.dumps(refs, protocol=protocol))


def _instances(fx: dict) -> dict:
    return copy.deepcopy(fx["instances"])  # the fixture shares its category list between calls


def _refs_of(fx: dict, image_id: int) -> set:
    return {ref["ref_id"] for ref in fx["refs"] if ref["image_id"] == image_id}


def _lose_image(fx: dict, image_id: int, reason: str, path_suffix: str) -> tuple[Expected, set]:
    """An image found unusable while planning: one failure for it, one `image_unavailable` per ref it takes along."""
    refs = _refs_of(fx, image_id)
    return [(reason, path_suffix)] + [("image_unavailable", f"#ref_id={r}") for r in refs], refs


def _bad_image_file(kind: str):
    def inject(fx: dict) -> tuple[Expected, set]:
        fx["image_paths"][TRAIN_IMAGE].write_bytes(BAD_IMAGE_BYTES[kind]())
        return [(BAD_IMAGE_REASON[kind], coco_file_name(TRAIN_IMAGE))], _refs_of(fx, TRAIN_IMAGE)
    return inject


def _wrong_extension(fx: dict) -> tuple[Expected, set]:
    """A JPEG stored as .png (the fixture also holds a PNG stored as .jpg): both are read by content."""
    instances = _instances(fx)
    record = next(im for im in instances["images"] if im["id"] == TRAIN_IMAGE)
    old = fx["image_paths"][TRAIN_IMAGE]
    record["file_name"] = old.with_suffix(".png").name
    old.rename(old.with_suffix(".png"))
    _write_instances(fx, instances)
    return [], set()


def _one_pixel_image(fx: dict) -> tuple[Expected, set]:
    instances, refs = _instances(fx), list(fx["refs"])
    Image.new("RGB", (1, 1), (0, 200, 0)).save(fx["images_dir"] / "dot.png")
    instances["images"].append({"id": 900001, "file_name": "dot.png", "width": 1, "height": 1})
    instances["annotations"].append({"id": 90001, "image_id": 900001, "category_id": 1, "iscrowd": 0, "area": 1.0,
                                     "segmentation": [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]], "bbox": [0, 0, 1, 1]})
    refs.append({"ref_id": 9001, "ann_id": 90001, "image_id": 900001, "split": "val", "category_id": 1,
                 "sentences": [{"sent_id": 90001, "sent": "the only pixel", "raw": "the only pixel"}]})
    _write_instances(fx, instances)
    _write_refs(fx, refs)
    return [], set()


def _missing_image(fx: dict) -> tuple[Expected, set]:
    fx["image_paths"][TRAIN_IMAGE].unlink()
    return _lose_image(fx, TRAIN_IMAGE, "missing_image_file", coco_file_name(TRAIN_IMAGE))


def _symlink_loop_image(fx: dict) -> tuple[Expected, set]:
    path = fx["image_paths"][TRAIN_IMAGE]
    path.unlink()
    os.symlink(path.name, path)  # the file is a link to itself
    return _lose_image(fx, TRAIN_IMAGE, "missing_image_file", coco_file_name(TRAIN_IMAGE))


def _file_name_outside(file_name: str):
    def inject(fx: dict) -> tuple[Expected, set]:
        instances = _instances(fx)
        next(im for im in instances["images"] if im["id"] == TRAIN_IMAGE)["file_name"] = file_name
        _write_instances(fx, instances)
        return _lose_image(fx, TRAIN_IMAGE, "unsafe_path", f"instances.json#image_id={TRAIN_IMAGE}")
    return inject


def _fixture_fault(kind: str):
    """One of refer_fixture's own faults: a ref dropped alone; `missing_image` is `_missing_image` above."""
    def inject(fx: dict) -> tuple[Expected, set]:
        ref_id = fx["faults"][kind]
        return [(kind, f"#ref_id={ref_id}")], {ref_id}
    inject.fixture_faults = (kind,)
    return inject


def _incomplete_image_record(fx: dict) -> tuple[Expected, set]:
    instances = _instances(fx)
    del next(im for im in instances["images"] if im["id"] == TRAIN_IMAGE)["height"]
    _write_instances(fx, instances)
    return _lose_image(fx, TRAIN_IMAGE, "malformed_image_record", f"instances.json#image_id={TRAIN_IMAGE}")


def _annotation_of_another_image(fx: dict) -> tuple[Expected, set]:
    refs = copy.deepcopy(fx["refs"])
    victim = next(r for r in refs if r["image_id"] == TRAIN_IMAGE)
    victim["ann_id"] = next(r["ann_id"] for r in refs if r["image_id"] == VAL_IMAGE)
    _write_refs(fx, refs)
    return [("annotation_image_mismatch", f"#ref_id={victim['ref_id']}")], {victim["ref_id"]}


def _blank_sentence(fx: dict) -> tuple[Expected, set]:
    refs = copy.deepcopy(fx["refs"])
    refs[0]["sentences"].append({"sent_id": 5000, "sent": "   ", "raw": ""})
    refs[0]["sentences"].append("not a sentence record")
    _write_refs(fx, refs)
    return [("blank_sentence", f"#ref_id={refs[0]['ref_id']}")], set()  # the ref keeps its other sentences


def _malformed_ref_entries(fx: dict) -> tuple[Expected, set]:
    refs = list(fx["refs"]) + ["a string, not a ref", {"ref_id": 77, "split": "train"}]
    _write_refs(fx, refs)
    n = len(refs)
    fx["refs"] = refs[:-2]
    return [("malformed_ref", f"#index={n - 2}"), ("malformed_ref", f"#index={n - 1}")], set()


def _size_mismatch(fx: dict) -> tuple[Expected, set]:
    """instances.json disagrees with the file: masks would not line up, so the image is skipped in the worker."""
    instances = _instances(fx)
    next(im for im in instances["images"] if im["id"] == VAL_IMAGE)["width"] += 3  # polygons only: all pass planning
    _write_instances(fx, instances)
    return [("size_mismatch", coco_file_name(VAL_IMAGE))], _refs_of(fx, VAL_IMAGE)


def _one_point_and_two_point_parts(fx: dict) -> tuple[Expected, set]:
    """A multi-part polygon keeps its good part; an annotation with only short parts loses its refs."""
    instances = _instances(fx)
    ref = next(r for r in fx["refs"] if r["image_id"] == VAL_IMAGE)
    ann = next(a for a in instances["annotations"] if a["id"] == ref["ann_id"])
    ann["segmentation"] = ann["segmentation"] + [[3.0, 3.0], [1.0, 1.0, 9.0, 9.0]]
    other = next(r for r in fx["refs"] if r["image_id"] == VAL_IMAGE and r["ann_id"] != ref["ann_id"])
    next(a for a in instances["annotations"] if a["id"] == other["ann_id"])["segmentation"] = [[4.0, 4.0], [1.0, 2.0, 3.0, 4.0]]
    _write_instances(fx, instances)
    lost = {r["ref_id"] for r in fx["refs"] if r["ann_id"] == other["ann_id"]}
    return [("degenerate_polygon", f"#ref_id={r}") for r in lost], lost


def _surrogate_sentence(fx: dict) -> tuple[Expected, set]:
    """A Python 3 pickle can carry a lone surrogate; it cannot be written as UTF-8 JSON."""
    refs = copy.deepcopy(fx["refs"])
    victim = next(r for r in refs if r["image_id"] == TRAIN_IMAGE)
    victim["sentences"] = [{"sent_id": 1, "sent": "bad \ud800 text", "raw": ""}]
    _write_refs(fx, refs, protocol=4)
    fx["refs"] = [r for r in refs if r is not victim]
    return [(None, f"#ref_id={victim['ref_id']}")], {victim["ref_id"]}


def _unhashable_ann_id(fx: dict) -> tuple[Expected, set]:
    refs = copy.deepcopy(fx["refs"])
    victim = next(r for r in refs if r["image_id"] == TRAIN_IMAGE)
    victim["ann_id"] = [victim["ann_id"]]
    _write_refs(fx, refs)
    return [(None, None)], {victim["ref_id"]}


def _malformed_rle(counts):
    def inject(fx: dict) -> tuple[Expected, set]:
        instances = _instances(fx)
        crowd = next(a for a in instances["annotations"] if isinstance(a["segmentation"], dict))
        crowd["segmentation"] = {"size": crowd["segmentation"]["size"], "counts": counts}
        _write_instances(fx, instances)
        lost = {r["ref_id"] for r in fx["refs"] if r["ann_id"] == crowd["id"]}
        return [(None, f"#ref_id={r}") for r in lost], lost
    return inject


REFCOCO_CASES = {
    **{f"{kind}_image": _bad_image_file(kind) for kind in BAD_IMAGE_BYTES},
    "wrong_extension": _wrong_extension,
    "one_pixel_image": _one_pixel_image,
    "missing_image_file": _missing_image,
    "symlink_loop_image": _symlink_loop_image,
    "file_name_dotdot": _file_name_outside("../../etc/passwd"),
    "file_name_absolute": _file_name_outside("/etc/passwd"),
    "image_record_incomplete": _incomplete_image_record,
    "ref_missing_annotation": _fixture_fault("missing_annotation"),
    "ref_annotation_of_another_image": _annotation_of_another_image,
    "ref_missing_image_record": _fixture_fault("missing_image_record"),
    "polygon_two_points": _fixture_fault("degenerate_polygon"),
    "polygon_short_parts": _one_point_and_two_point_parts,
    "ref_without_sentences": _fixture_fault("no_sentences"),
    "blank_sentence": _blank_sentence,
    "malformed_ref_entries": _malformed_ref_entries,
    "size_mismatch": _size_mismatch,
    "sentence_lone_surrogate": _surrogate_sentence,
    "ref_unhashable_ann_id": _unhashable_ann_id,
    "rle_garbage_counts": _malformed_rle("!!!garbage"),
    "rle_non_integer_counts": _malformed_rle(["a", None]),
}


def _build_refcoco(fx: dict, out: Path) -> dict:
    return api.build_refcoco(fx["refer_root"], fx["images_dir"], fx["dataset"], fx["split_by"], out,
                             workers=0, shard_size=2)


@pytest.mark.parametrize("inject", REFCOCO_CASES.values(), ids=REFCOCO_CASES)
def test_refcoco_fault_is_skipped_reported_and_nothing_good_is_lost(tmp_path, inject):
    fx = make_refer_fixture(tmp_path / "src", faults=getattr(inject, "fixture_faults", ()))
    expected_failures, lost = inject(fx)
    out = tmp_path / "out"
    summary = _build_refcoco(fx, out)
    failures = read_failures(out)
    assert_reported(failures, expected_failures)
    assert_build_is_whole(out, summary, failures)
    assert stored_refcoco(out) == expected_refcoco(fx, lost)


def test_refcoco_empty_split_is_noted_and_the_other_splits_are_built(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    _write_refs(fx, [r for r in fx["refs"] if r["split"] != "testB"])
    out = tmp_path / "out"
    summary = _build_refcoco(fx, out)
    card = json.loads((out / "dataset.json").read_text())
    assert card["source"]["empty_splits"] == ["testB"] and "testB" in card["source"]["notes"][0]
    assert sorted(card["splits"]) == ["testA", "train", "val"] and not (out / "testB").exists()
    assert_build_is_whole(out, summary, read_failures(out))
    assert stored_refcoco(out) == expected_refcoco(fx, set())


def test_refcoco_one_pixel_image_keeps_its_one_pixel_mask(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    _one_pixel_image(fx)
    out = tmp_path / "out"
    _build_refcoco(fx, out)
    doc = json.loads(read_samples(out)["val"]["img000000900001"]["json"])
    assert (doc["width"], doc["height"]) == (1, 1) and doc["refs"][0]["mask"]["size"] == [1, 1]


# ---------------------------------------------------------------- caption folder cases

GOOD_TREE = {  # relative image path -> caption file name and content, and the captions the sample must keep
    "a.jpg": ("a.txt", "a red bus\n\n a red bus \na bus on a street\n", ["a red bus", "a bus on a street"]),
    "sub/b.png": ("sub/b.json", json.dumps({"captions": ["a green square", "grün"]}), ["a green square", "grün"]),
    "c d é.jpeg": ("c d é.txt", "spaces and accents\n", ["spaces and accents"]),
    "sub/deeper/E.JPG": ("sub/deeper/E.txt", "upper-case extension", ["upper-case extension"]),
}


def make_caption_tree(root: Path) -> dict[str, list[str]]:
    for rel, (caption_rel, content, _) in GOOD_TREE.items():
        fmt = "PNG" if rel.endswith(".png") else "JPEG"
        put(root / rel, image_bytes(16 + len(rel), 10, fmt))
        put(root / caption_rel, content)
    return {rel: captions for rel, (_, _, captions) in GOOD_TREE.items()}


def _folder_bad_image(kind: str):
    def inject(root: Path, outside: Path) -> tuple[Expected, dict]:
        put(root / "sub" / "bad.jpg", BAD_IMAGE_BYTES[kind]())
        put(root / "sub" / "bad.txt", "a caption for a bad file")
        return [(BAD_IMAGE_REASON[kind], "sub/bad.jpg")], {}
    return inject


def _folder_wrong_extension(root: Path, outside: Path) -> tuple[Expected, dict]:
    put(root / "jpeg_named.png", image_bytes(10, 8, "JPEG"))
    put(root / "jpeg_named.txt", "a JPEG named .png")
    put(root / "png_named.jpg", image_bytes(10, 8, "PNG"))
    put(root / "png_named.txt", "a PNG named .jpg")
    return [], {"jpeg_named.png": ["a JPEG named .png"], "png_named.jpg": ["a PNG named .jpg"]}


def _folder_one_pixel(root: Path, outside: Path) -> tuple[Expected, dict]:
    put(root / "dot.png", image_bytes(1, 1, "PNG"))
    put(root / "dot.txt", "one pixel")
    return [], {"dot.png": ["one pixel"]}


def _folder_case(files: dict[str, bytes | str], expected: Expected):
    def inject(root: Path, outside: Path) -> tuple[Expected, dict]:
        for rel, data in files.items():
            put(root / rel, image_bytes() if data == "IMAGE" else data)
        return expected, {}
    return inject


def _folder_symlink_loop(root: Path, outside: Path) -> tuple[Expected, dict]:
    os.symlink("..", root / "sub" / "loop")  # a folder link back to the root
    os.symlink("self.jpg", root / "self.jpg")  # a file link to itself
    put(root / "self.txt", "the caption of a link loop")
    return [("symlink_loop", "sub/loop"), ("broken_symlink", "self.jpg"), ("caption_without_image", "self.txt")], {}


def _folder_link_outside(root: Path, outside: Path) -> tuple[Expected, dict]:
    put(outside / "secret.jpg", image_bytes())
    put(outside / "secret.txt", "outside the corpus")
    os.symlink(outside, root / "escape")
    os.symlink(outside / "secret.jpg", root / "secret.jpg")
    put(root / "secret.txt", "a linked image outside the corpus")
    return [("outside_root", "escape"), ("outside_root", "secret.jpg"), ("caption_without_image", "secret.txt")], {}


FOLDER_CASES = {
    **{f"{kind}_image": _folder_bad_image(kind) for kind in BAD_IMAGE_BYTES},
    "wrong_extension": _folder_wrong_extension,
    "one_pixel_image": _folder_one_pixel,
    "missing_caption": _folder_case({"nocap.jpg": "IMAGE"}, [("missing_caption", "nocap.jpg")]),
    "blank_caption": _folder_case({"blank.jpg": "IMAGE", "blank.txt": " \n\t\n"}, [("blank_caption", "blank.txt")]),
    "non_utf8_caption": _folder_case({"latin.jpg": "IMAGE", "latin.txt": "caf\xe9".encode("latin-1")},
                                     [("undecodable_caption", "latin.txt")]),
    "malformed_caption_json": _folder_case({"bad.jpg": "IMAGE", "bad.json": '{"caption": '},
                                           [("malformed_caption", "bad.json")]),
    "oversized_caption": _folder_case({"big.jpg": "IMAGE", "big.txt": "x" * ((1 << 20) + 1)},
                                      [("oversized_caption", "big.txt")]),
    "caption_without_image": _folder_case({"sub/orphan.txt": "no image"}, [("caption_without_image", "sub/orphan.txt")]),
    "unsupported_image_type": _folder_case({"photo.heic": b"\x00\x00\x00\x18ftypheic", "photo.txt": "heic"},
                                           [("unsupported_image", "photo.txt")]),
    "symlink_loops": _folder_symlink_loop,
    "link_outside_root": _folder_link_outside,
}


@pytest.mark.parametrize("inject", FOLDER_CASES.values(), ids=FOLDER_CASES)
def test_caption_folder_fault_is_skipped_reported_and_nothing_good_is_lost(tmp_path, inject):
    root = tmp_path / "corpus"
    good = make_caption_tree(root)
    expected_failures, extra_good = inject(root, tmp_path / "outside")
    out = tmp_path / "out"
    summary = api.build_captions(root, out, workers=0, shard_size=2)
    failures = read_failures(out)
    assert_reported(failures, expected_failures)
    assert_build_is_whole(out, summary, failures)
    assert stored_captions(out) == {**good, **extra_good}
    assert "secret" not in json.dumps(stored_captions(out))


# ---------------------------------------------------------------- caption table cases


def _row_case(rows: list[tuple], reasons: list[str], files: dict[str, Callable[[Path, Path], None]] | None = None,
              extra_good: dict | None = None):
    """Fault rows appended after the good rows of a CSV; each expected failure names its line."""
    def inject(root: Path, outside: Path) -> tuple[Path, Expected, dict]:
        for rel, make in (files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            make(root / rel, outside)
        path = write_csv(root / "pairs.csv", GOOD_ROWS + rows)
        first = len(GOOD_ROWS) + 2  # line 1 is the header
        expected = [(reason, f"pairs.csv:{first + i}" if reason in PLANNING_REASONS else rows[i][0].split("/")[-1])
                    for i, reason in enumerate(reasons) if reason]
        return path, expected, extra_good or {}
    return inject


PLANNING_REASONS = {"outside_root", "missing_image", "blank_caption", "undecodable_caption", "remote_image",
                    "missing_caption", "malformed_row"}


def _write(data: bytes | Callable[[], bytes]):
    return lambda path, outside: path.write_bytes(data() if callable(data) else data)


def _link_to_outside(path: Path, outside: Path) -> None:
    put(outside / "secret.jpg", image_bytes())
    os.symlink(outside / "secret.jpg", path)


def _self_link(path: Path, outside: Path) -> None:
    os.symlink(path.name, path)


def _jsonl_case(root: Path, outside: Path) -> tuple[Path, Expected, dict]:
    lines = [json.dumps({"image": image, "caption": caption}) for image, caption in GOOD_ROWS]
    lines += ['{"image": "three.jpg"}', "not json at all", '["a", "list"]', json.dumps({"image": "three.jpg",
              "caption": ["a list", "of captions", ""]}), json.dumps({"image": "img/one.jpg", "caption": 42})]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n = len(GOOD_ROWS)
    expected = [("missing_caption", f"pairs.jsonl:{n + 1}"), ("malformed_row", f"pairs.jsonl:{n + 2}"),
                ("malformed_row", f"pairs.jsonl:{n + 3}"), ("malformed_row", f"pairs.jsonl:{n + 5}")]
    return path, expected, {"three.jpg": ["third, with a comma", "a list", "of captions"]}


def _ragged_row(root: Path, outside: Path) -> tuple[Path, Expected, dict]:
    path = write_csv(root / "pairs.csv", GOOD_ROWS)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("three.jpg,one,too many\n")
    return path, [("malformed_row", f"pairs.csv:{len(GOOD_ROWS) + 2}")], {}


def _ragged_non_utf8_row(root: Path, outside: Path) -> tuple[Path, Expected, dict]:
    path = write_csv(root / "pairs.csv", GOOD_ROWS)
    with open(path, "ab") as handle:
        handle.write(b"three.jpg,caf\xe9,too many\n")
    return path, [("malformed_row", f"pairs.csv:{len(GOOD_ROWS) + 2}")], {}


TABLE_CASES = {
    "row_dotdot_etc_passwd": _row_case([("../../etc/passwd", "escape")], ["outside_root"]),
    "row_absolute_outside": _row_case([("/etc/hostname", "absolute")], ["outside_root"]),
    "row_link_outside": _row_case([("img/link.jpg", "a link out")], ["outside_root"], {"img/link.jpg": _link_to_outside}),
    "row_symlink_loop": _row_case([("img/loop.jpg", "a loop")], ["missing_image"], {"img/loop.jpg": _self_link}),
    "row_missing_image": _row_case([("img/gone.jpg", "gone")], ["missing_image"]),
    "row_without_image_path": _row_case([("", "no path")], ["missing_image"]),
    "row_url": _row_case([("https://example.com/x.jpg", "remote")], ["remote_image"]),
    "row_blank_caption": _row_case([("img/one.jpg", "   "), ("three.jpg", "")], ["blank_caption", "blank_caption"]),
    "row_non_utf8_caption": _row_case([(b"three.jpg", b"caf\xe9")], ["undecodable_caption"]),
    **{f"row_{kind}_image": _row_case([(f"img/{kind}.jpg", "bad file")], [BAD_IMAGE_REASON[kind]],
                                      {f"img/{kind}.jpg": _write(BAD_IMAGE_BYTES[kind])}) for kind in BAD_IMAGE_BYTES},
    "row_wrong_extension": _row_case([("img/jpeg.png", "a JPEG named .png")], [None],
                                     {"img/jpeg.png": _write(image_bytes(8, 8, "JPEG"))},
                                     {"img/jpeg.png": ["a JPEG named .png"]}),
    "row_one_pixel_image": _row_case([("img/dot.png", "one pixel")], [None], {"img/dot.png": _write(image_bytes(1, 1, "PNG"))},
                                     {"img/dot.png": ["one pixel"]}),
    "jsonl_missing_and_malformed": _jsonl_case,
    "csv_ragged_row": _ragged_row,
    "csv_ragged_non_utf8_row": _ragged_non_utf8_row,
}


@pytest.mark.parametrize("inject", TABLE_CASES.values(), ids=TABLE_CASES)
def test_caption_table_fault_is_skipped_reported_and_nothing_good_is_lost(tmp_path, inject):
    root = tmp_path / "table"
    make_table_root(root)
    table, expected_failures, extra_good = inject(root, tmp_path / "outside")
    out = tmp_path / "out"
    summary = api.build_captions(table, out, workers=0, shard_size=2)
    failures = read_failures(out)
    assert_reported(failures, expected_failures)
    assert_build_is_whole(out, summary, failures)
    assert stored_captions(out) == {**GOOD_TABLE, **extra_good}


# ---------------------------------------------------------------- fatal input: one sentence, nothing written


class _RunsCode:
    """Unpickling this calls os.system: what a hostile refs file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refcoco_breaker(change: Callable[[dict, Path], None]):
    def make(tmp_path: Path) -> Callable[[Path], dict]:
        fx = make_refer_fixture(tmp_path / "src")
        change(fx, tmp_path)
        return lambda out: _build_refcoco(fx, out)
    return make


def _captions_breaker(change: Callable[[Path], Path]):
    def make(tmp_path: Path) -> Callable[[Path], dict]:
        src = change(tmp_path / "src")
        return lambda out: api.build_captions(src, out, workers=0)
    return make


def _empty_folder(src: Path) -> Path:
    src.mkdir()
    return src


def _table_without_caption_column(src: Path) -> Path:
    make_table_root(src)
    return put(src / "pairs.csv", "image,words\nthree.jpg,hello\n")


def _garbage_parquet(src: Path) -> Path:
    make_table_root(src)
    return put(src / "pairs.parquet", b"PAR1 this is not parquet")


def _non_utf8_csv_header(src: Path) -> Path:
    make_table_root(src)
    return put(src / "pairs.csv", b"imag\xe9,caption\nthree.jpg,hello\n")


FATAL_CASES = {
    "instances_not_json": (_refcoco_breaker(lambda fx, tmp: fx["instances_path"].write_text("{\"images\": [")),
                           "is not valid JSON"),
    "instances_without_images": (_refcoco_breaker(lambda fx, tmp: fx["instances_path"].write_text('{"annotations": []}')),
                                 "no 'images' list"),
    "instances_missing": (_refcoco_breaker(lambda fx, tmp: fx["instances_path"].unlink()), "does not exist"),
    "refs_pickle_runs_code": (_refcoco_breaker(lambda fx, tmp: fx["refs_path"].write_bytes(
        pickle.dumps([_RunsCode(tmp / "pwned")], protocol=2))), "refusing to run code from a data file"),
    "refs_pickle_truncated": (_refcoco_breaker(lambda fx, tmp: fx["refs_path"].write_bytes(
        fx["refs_path"].read_bytes()[:100])), "is not a readable pickle"),
    "refs_not_a_list": (_refcoco_breaker(lambda fx, tmp: fx["refs_path"].write_bytes(pickle.dumps({"refs": []}))),
                        "not the list of refs"),
    "images_folder_missing": (_refcoco_breaker(lambda fx, tmp: os.rename(fx["images_dir"], tmp / "moved")),
                              "images folder"),
    "captions_empty_folder": (_captions_breaker(_empty_folder), "holds no images and no captions"),
    "captions_source_missing": (_captions_breaker(lambda src: src), "does not exist"),
    "table_without_caption_column": (_captions_breaker(_table_without_caption_column), "no caption column"),
    "table_not_parquet": (_captions_breaker(_garbage_parquet), "cannot read the table pairs.parquet"),
    "table_header_not_utf8": (_captions_breaker(_non_utf8_csv_header), "pairs.csv"),
}


@pytest.mark.parametrize("case", FATAL_CASES.values(), ids=FATAL_CASES)
def test_fatal_input_is_one_sentence_and_nothing_is_written(tmp_path, case):
    make, message = case
    run = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        run(out)
    text = str(caught.value)
    assert message in text and len(text.splitlines()) == 1 and text[-1] in ".?"
    assert not out.exists()  # refused while planning, before OUT is touched
    assert not (tmp_path / "pwned").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sgdata", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_refuses_a_refs_pickle_that_runs_code_with_exit_2_and_one_line(tmp_path):
    fx = make_refer_fixture(tmp_path / "src")
    marker = tmp_path / "pwned"
    fx["refs_path"].write_bytes(pickle.dumps([{"ref_id": 1}, _RunsCode(marker)], protocol=2))
    out = tmp_path / "out"
    done = _cli("build", "refcoco", "--refer-root", str(fx["refer_root"]), "--images", str(fx["images_dir"]),
                "--dataset", "refcoco", "--split-by", "unc", "--out", str(out), "--workers", "0", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgdata: refs file ") and "refusing to run code" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not marker.exists() and not out.exists()


def test_cli_table_row_outside_its_folder_is_reported_not_read(tmp_path):
    root = tmp_path / "table"
    make_table_root(root)
    write_csv(root / "pairs.csv", GOOD_ROWS + [("../../etc/passwd", "escape")])
    out = tmp_path / "out"
    done = _cli("build", "captions", str(root / "pairs.csv"), "--out", str(out), "--workers", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [(f["reason"], f["path"]) for f in read_failures(out)] == [("outside_root", f"pairs.csv:{len(GOOD_ROWS) + 2}")]
    assert stored_captions(out) == GOOD_TABLE
    assert b"root:" not in b"".join(p.read_bytes() for p in out.rglob("*.tar"))


# ---------------------------------------------------------------- resource bound: the pixel limit


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (width, height) of every image PIL decodes while the test runs."""
    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


def test_image_above_the_pixel_limit_is_refused_before_any_pixel_is_decoded(tmp_path, decoded_sizes):
    bomb = put(tmp_path / "bomb.png", bomb_bytes())
    assert bomb.stat().st_size < 1_000_000  # 81 M pixels in well under a megabyte
    with pytest.raises(SampleError) as caught:
        load_image(bomb)
    assert caught.value.reason == "image_too_large" and "81000000" in caught.value.detail
    assert decoded_sizes == []

    # The same kind of file under and over a limit: refused without decoding, or decoded (so the spy sees decodes).
    real = put(tmp_path / "real.png", png_of_zeros(600, 500))
    with pytest.raises(SampleError, match="image_too_large"):
        load_image(real, max_pixels=299_999)
    assert decoded_sizes == []
    stored = load_image(real, max_pixels=300_000, max_size=64)
    assert decoded_sizes and max(w * h for w, h in decoded_sizes) <= 300_000 and max(stored.width, stored.height) == 64


def test_a_build_never_decodes_an_image_above_the_limit(tmp_path, decoded_sizes):
    root = tmp_path / "corpus"
    good = make_caption_tree(root)
    put(root / "bomb.jpg", bomb_bytes())
    put(root / "bomb.txt", "a decompression bomb named .jpg")
    out = tmp_path / "out"
    api.build_captions(root, out, workers=0)
    assert [(f["reason"], Path(f["path"]).name) for f in read_failures(out)] == [("image_too_large", "bomb.jpg")]
    assert stored_captions(out) == good
    assert decoded_sizes and max(w * h for w, h in decoded_sizes) <= DEFAULT_MAX_PIXELS


def test_a_corpus_with_no_good_item_is_refused_in_one_sentence_with_every_fault_listed(tmp_path):
    """A build with no sample at all fails (UserError, exit 2 from the CLI), yet failures.jsonl lists every fault."""
    root = tmp_path / "corpus"
    put(root / "nocap.jpg", image_bytes())
    put(root / "zero.jpg", b"")
    put(root / "zero.txt", "an empty image file")
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        api.build_captions(root, out, workers=0)
    text = str(caught.value)
    assert text.startswith("no sample could be built") and len(text.splitlines()) == 1 and text[-1] == "."
    assert "missing_caption" in text and "unreadable_image" in text and str(out / "failures.jsonl") in text
    failures = read_failures(out)
    assert_reported(failures, [("missing_caption", "nocap.jpg"), ("unreadable_image", "zero.jpg")])
    assert_build_is_whole(out, {"failed_shards": [], "failures": len(failures)}, failures)
    assert json.loads((out / "train" / "stats.json").read_text())["samples"] == 0 and read_samples(out) == {}

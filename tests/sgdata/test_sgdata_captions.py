"""Caption source: messy folder trees and tables plan exactly the good items and report every fault."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sgdata.format.errors import UserError
from sgdata.sources.base import StoredImage
from sgdata.sources.captions import caption_key, finalize, plan_captions, unique_keys

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")


def _image(path: Path, mode: str = "RGB", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 6), 128 if mode == "L" else (200, 30, 30)).save(path, format=fmt)
    return path


def _text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _stored(width: int = 8, height: int = 6) -> StoredImage:
    return StoredImage(data=b"", width=width, height=height, source_width=width, source_height=height,
                       transpose=None, passthrough=True)


def _by_source(plan) -> dict[str, list[str]]:
    return {spec.record["source"]: spec.record["captions"] for spec in plan.splits["train"]}


def _failures(plan) -> dict[str, str]:
    return {failure.path: failure.reason for failure in plan.failures}


@pytest.fixture
def messy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    _image(root / "a.jpg")
    _text(root / "a.txt", "a red bus\n\n  a bus on a street  \na red bus\n")
    _image(root / "nested" / "deeper" / "B.JPG")
    _text(root / "nested" / "deeper" / "B.txt", "upper case extension")
    _image(root / "nested" / "gray.png", mode="L")
    _text(root / "nested" / "gray.json", json.dumps({"caption": "grey"}))
    _image(root / "nested" / "pic.webp", fmt="WEBP")
    _text(root / "nested" / "pic.json", json.dumps(["one", "two"]))
    _image(root / "my photo.v2.final.jpeg")
    _text(root / "my photo.v2.final.txt", "dots and spaces")
    _image(root / "café ünïcödé.png")
    _text(root / "café ünïcödé.json", json.dumps({"captions": ["naïve", "日本"]}))
    # img2dataset style: .txt wins, the metadata .json beside it is ignored
    _image(root / "00001.jpg")
    _text(root / "00001.txt", "from txt")
    _text(root / "00001.json", '{"url": "x"}')
    # faults
    _image(root / "nocap.jpg")
    _image(root / "blank.jpg")
    _text(root / "blank.txt", "  \n\t\n")
    _image(root / "latin1.jpg")
    _text(root / "latin1.txt", "caf\xe9".encode("latin-1"))
    _image(root / "badjson.jpg")
    _text(root / "badjson.json", '{"caption": ')
    _text(root / "orphan.txt", "a caption without its image")
    _text(root / "photo.heic", b"not supported")
    _text(root / "photo.txt", "an unsupported image")
    _text(root / "README.md", "not part of the corpus")
    os.symlink("..", root / "nested" / "loop")  # a folder link back to the root
    os.symlink("/etc", root / "escape")  # a link leaving the root
    os.symlink("../a.jpg", root / "nested" / "alias.jpg")  # a file link inside the root is used
    _text(root / "nested" / "alias.txt", "linked image")
    return root


def test_folder_tree_plans_exactly_the_good_items(messy_tree: Path) -> None:
    plan = plan_captions(messy_tree)
    assert plan.kind == "captions" and list(plan.splits) == ["train"]
    assert _by_source(plan) == {
        "a.jpg": ["a red bus", "a bus on a street"],
        "nested/deeper/B.JPG": ["upper case extension"],
        "nested/gray.png": ["grey"],
        "nested/pic.webp": ["one", "two"],
        "my photo.v2.final.jpeg": ["dots and spaces"],
        "café ünïcödé.png": ["naïve", "日本"],
        "00001.jpg": ["from txt"],
        "nested/alias.jpg": ["linked image"],
    }
    assert _failures(plan) == {
        "nocap.jpg": "missing_caption",
        "blank.txt": "blank_caption",
        "latin1.txt": "undecodable_caption",
        "badjson.json": "malformed_caption",
        "orphan.txt": "caption_without_image",
        "photo.txt": "unsupported_image",
        "nested/loop": "symlink_loop",
        "escape": "outside_root",
    }
    specs = plan.splits["train"]
    assert [spec.key for spec in specs] == sorted(spec.key for spec in specs)
    assert all(KEY_PATTERN.match(spec.key) and Path(spec.image_path).is_file() for spec in specs)
    assert plan.card["images"] == 8 and plan.card["layout"] == "folder"


def test_keys_are_stable_across_runs_and_copies(messy_tree: Path, tmp_path: Path) -> None:
    first = [spec.key for spec in plan_captions(messy_tree).splits["train"]]
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    os.rename(messy_tree, copy / "corpus")
    assert [spec.key for spec in plan_captions(copy / "corpus").splits["train"]] == first


def test_missing_or_unknown_source_is_one_sentence_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        plan_captions(tmp_path / "nope")
    with pytest.raises(UserError, match="neither a folder nor"):
        plan_captions(_text(tmp_path / "list.xlsx", "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images and no captions"):
        plan_captions(tmp_path / "empty")


# ---------------------------------------------------------------- tables


@pytest.fixture
def table_root(tmp_path: Path) -> Path:
    root = tmp_path / "table"
    _image(root / "img" / "one.jpg")
    _image(root / "img" / "two words.png")
    _image(root / "three.jpg")
    _text(tmp_path / "outside.jpg", b"secret")
    return root


GOOD_ROWS = [("img/one.jpg", "first"), ("img/two words.png", "second"), ("img/one.jpg", "first again"),
             ("./three.jpg", "third")]
BAD_ROWS = [("../../etc/passwd", "escape"), ("../outside.jpg", "sibling"), ("/etc/hostname", "absolute"),
            ("img/missing.jpg", "gone"), ("three.jpg", "   "), ("", "no path"), ("http://example.com/x.jpg", "web")]
BAD_REASONS = ["outside_root", "outside_root", "outside_root", "missing_image", "blank_caption", "missing_image",
               "remote_image"]
EXPECTED = {"img/one.jpg": ["first", "first again"], "img/two words.png": ["second"], "three.jpg": ["third"]}


def _write_table(root: Path, fmt: str, rows: list[tuple[str, str]], image_col: str = "image",
                 caption_col: str = "caption") -> Path:
    path = root / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({image_col: image, caption_col: caption}) + "\n" for image, caption in rows))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [f"{image_col}{sep}{caption_col}"] + [f'{image}{sep}"{caption}"' for image, caption in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table({image_col: [r[0] for r in rows], caption_col: [r[1] for r in rows]}), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_tables_merge_rows_and_refuse_paths_outside_their_folder(table_root: Path, fmt: str) -> None:
    path = _write_table(table_root, fmt, GOOD_ROWS + BAD_ROWS)
    plan = plan_captions(path)
    assert _by_source(plan) == EXPECTED
    reasons = [failure.reason for failure in plan.failures]
    assert reasons == BAD_REASONS
    first_line = 2 if fmt in ("csv", "tsv") else 1  # CSV/TSV line 1 is the header
    assert plan.failures[0].path == f"pairs.{fmt}:{first_line + len(GOOD_ROWS)}"
    assert "passwd" not in "".join(spec.image_path for spec in plan.splits["train"])
    assert plan.card["rows"] == len(GOOD_ROWS + BAD_ROWS)


def test_table_columns_by_common_names_and_unknown_columns(table_root: Path) -> None:
    path = _write_table(table_root, "csv", GOOD_ROWS, image_col="File_Path", caption_col="TEXT")
    assert _by_source(plan_captions(path)) == EXPECTED
    path = _write_table(table_root, "jsonl", GOOD_ROWS, image_col="picture", caption_col="caption")
    with pytest.raises(UserError, match="no image-path column") as info:
        plan_captions(path)
    assert "picture" in str(info.value) and str(info.value).count(".") <= 3


def test_table_cells_that_are_not_utf8_or_rows_that_are_ragged(table_root: Path) -> None:
    path = table_root / "pairs.csv"
    path.write_bytes(b"image,caption\nimg/one.jpg,good\nthree.jpg,caf\xe9\nimg/two words.png,x,extra\n")
    plan = plan_captions(path)
    assert _by_source(plan) == {"img/one.jpg": ["good"]}
    assert sorted(f.reason for f in plan.failures) == ["malformed_row", "undecodable_caption"]
    jsonl = table_root / "pairs.jsonl"
    jsonl.write_bytes(b'{"image": "img/one.jpg", "captions": ["a", "b"]}\nnot json\n[1]\n'
                      b'{"image": "three.jpg", "captions": "caf\xe9"}\n')
    plan = plan_captions(jsonl)
    assert _by_source(plan) == {"img/one.jpg": ["a", "b"]}
    assert [(f.path, f.reason) for f in plan.failures] == [
        ("pairs.jsonl:2", "malformed_row"), ("pairs.jsonl:3", "malformed_row"),
        ("pairs.jsonl:4", "undecodable_caption")]


def test_parquet_list_captions_and_non_text_columns(table_root: Path) -> None:
    path = table_root / "lists.parquet"
    pq.write_table(pa.table({"path": ["img/one.jpg"], "captions": [["x", "y", "x"]]}), path)
    assert _by_source(plan_captions(path)) == {"img/one.jpg": ["x", "y"]}
    image_struct = pa.array([{"bytes": b"\xff", "path": "a.jpg"}])
    pq.write_table(pa.table({"image": image_struct, "text": ["t"]}), path)
    with pytest.raises(UserError, match="not text or file paths"):
        plan_captions(path)


# ---------------------------------------------------------------- finalize and keys


def test_finalize_writes_the_same_schema_for_every_sample(messy_tree: Path) -> None:
    plan = plan_captions(messy_tree)
    schemas = set()
    for spec in plan.splits["train"]:
        result = finalize(spec.record, _stored(40, 30))
        sample = json.loads(result.files["json"])
        schemas.add(tuple(sorted(sample)))
        assert sample["captions"] == spec.record["captions"] == result.texts
        assert (sample["width"], sample["height"]) == (40, 30)
        assert result.files["txt"].decode("utf-8") == spec.record["captions"][0]
        assert result.source_id == spec.record["source"] == sample["source"]
        assert finalize(spec.record, _stored(40, 30)).files == result.files  # deterministic bytes
    assert schemas == {("captions", "height", "source", "width")}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=4))
def test_any_caption_text_round_trips_through_finalize(captions: list[str]) -> None:
    result = finalize({"source": "x.jpg", "captions": captions}, _stored())
    assert json.loads(result.files["json"].decode("utf-8"))["captions"] == captions
    assert result.files["txt"].decode("utf-8") == captions[0]


_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
_rel_paths = st.lists(st.text(_name_chars, min_size=1, max_size=30).filter(lambda s: s not in (".", "..")),
                      min_size=1, max_size=3).map("/".join)


@settings(max_examples=300, deadline=None)
@given(st.sets(_rel_paths, min_size=1, max_size=8))
def test_any_relative_paths_give_valid_unique_dotless_keys(paths: set[str]) -> None:
    keys = unique_keys(sorted(paths))
    assert len(set(keys.values())) == len(paths)
    for path, key in keys.items():
        assert KEY_PATTERN.match(key) and len(key) <= 40 + 1 + 40
        assert key == caption_key(path)  # no collision here, so the short form


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.text(_name_chars, min_size=1, max_size=40).filter(lambda s: s not in (".", "..")
                                                                    and len(s.encode()) < 200),
               min_size=1, max_size=4))
def test_odd_file_names_in_a_folder_are_all_planned(tmp_path_factory, names: set[str]) -> None:
    root = tmp_path_factory.mktemp("odd")
    stems = set()
    for name in names:
        stem = name + "_"  # keep user text in the stem; the extension is ours
        if stem.lower() in stems:
            continue
        stems.add(stem.lower())
        _image(root / f"{stem}.jpg")
        _text(root / f"{stem}.txt", f"caption of {name}")
    plan = plan_captions(root)
    assert not plan.failures
    assert sorted(_by_source(plan)) == sorted(f"{stem}.jpg" for stem in _stems_on_disk(root))
    keys = [spec.key for spec in plan.splits["train"]]
    assert len(set(keys)) == len(keys) and all(KEY_PATTERN.match(key) for key in keys)


def _stems_on_disk(root: Path) -> list[str]:
    return [name[:-4] for name in os.listdir(root) if name.endswith(".jpg")]


def test_non_utf8_file_name_is_kept_with_a_readable_source(tmp_path: Path) -> None:
    root = tmp_path / "bytes"
    root.mkdir()
    raw = os.fsencode(root) + b"/caf\xe9"
    Image.new("RGB", (4, 4)).save(raw.decode("utf-8", "surrogateescape") + ".jpg", format="JPEG")
    with open(raw + b".txt", "wb") as handle:
        handle.write(b"a cafe")
    plan = plan_captions(root)
    (spec,) = plan.splits["train"]
    assert spec.record["source"] == "caf\\xe9.jpg"
    assert os.path.isfile(spec.image_path) and KEY_PATTERN.match(spec.key)
    json.dumps(spec.record).encode("utf-8")  # the record is valid UTF-8 JSON


def test_messy_tree_builds_shards_with_every_good_item_and_every_fault(messy_tree: Path, tmp_path: Path) -> None:
    """End to end through the build: the good images are in the tars, the faults in failures.jsonl."""
    import tarfile

    from sgdata.api import build_captions

    (messy_tree / "zero.jpg").write_bytes(b"")  # planned (it has a caption), refused when decoded
    (messy_tree / "zero.txt").write_text("an empty file")
    out = tmp_path / "shards"
    build_captions(messy_tree, out, workers=0)
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("train/*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    plan = plan_captions(messy_tree)
    zero = next(spec for spec in plan.splits["train"] if spec.record["source"] == "zero.jpg")
    plan.splits["train"].remove(zero)
    assert sorted(samples) == sorted(spec.key for spec in plan.splits["train"])
    assert {tuple(sorted(files)) for files in samples.values()} == {("jpg", "json", "txt")}
    sources = {json.loads(files["json"])["source"]: json.loads(files["json"])["captions"] for files in samples.values()}
    assert sources == _by_source(plan)
    reported = {json.loads(line)["path"]: json.loads(line)["reason"]
                for line in (out / "failures.jsonl").read_text().splitlines()}
    decoded = {path: reason for path, reason in reported.items() if path.endswith("zero.jpg")}
    assert list(decoded.values()) == ["unreadable_image"]
    assert {path: reason for path, reason in reported.items() if path not in decoded} == _failures(plan)

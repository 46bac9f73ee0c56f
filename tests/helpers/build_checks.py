"""Small corpora and reading a build back, shared by the sgdata build tests.

A build is checked as a whole, not only by its planner: failures.jsonl holds exactly the expected
(reason, path) entries, stats.json and dataset.json count the same failures, the shards hold exactly
the good items and agree with the manifest, and verify passes.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from sgdata.format import iter_tar_samples
from sgdata.verify import verify_dataset

Expected = list[tuple[str | None, str | None]]  # (reason, path suffix) per failure line; None matches anything


def image_bytes(width: int = 12, height: int = 9, fmt: str = "JPEG", colour=(180, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def read_failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()]


def read_samples(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """split -> key -> {extension: bytes}, from the tars alone."""
    samples: dict[str, dict[str, dict[str, bytes]]] = {}
    for tar in sorted(out.glob("*/*.tar")):
        for key, files in iter_tar_samples(tar):
            assert key not in samples.setdefault(tar.parent.name, {}), f"{key} stored twice"
            samples[tar.parent.name][key] = files
    return samples


def assert_reported(failures: list[dict], expected: Expected) -> None:
    """failures.jsonl holds exactly the expected entries (a multiset match on reason and path suffix)."""
    left = list(failures)
    for reason, suffix in expected:
        match = next((f for f in left if (reason is None or f["reason"] == reason)
                      and (suffix is None or f["path"].endswith(suffix))), None)
        assert match is not None, f"no failure ({reason}, ...{suffix}) in {failures}"
        left.remove(match)
        assert match["detail"] and "\n" not in match["detail"]
    assert left == [], f"unexpected failures: {left}"


def assert_build_is_whole(out: Path, summary: dict, failures: list[dict]) -> None:
    """No failed shard; stats.json, dataset.json and the summary count what failures.jsonl lists; verify passes."""
    assert summary["failed_shards"] == []
    card = json.loads((out / "dataset.json").read_text())
    assert card["failures"] == len(failures) == summary["failures"]
    for split in card["splits"]:
        stats = json.loads((out / split / "stats.json").read_text())
        listed = Counter(f["reason"] for f in failures if f["split"] == split)
        assert stats["failures_by_reason"] == dict(listed) and stats["failures"] == sum(listed.values()), split
        assert stats["complete"]
        manifest = pq.read_table(out / split / "manifest.parquet").column("key").to_pylist()
        stored = [key for tar in sorted((out / split).glob("*.tar")) for key, _ in iter_tar_samples(tar)]
        assert manifest == stored, split
    assert verify_dataset(out) == []


def expected_refcoco(fx: dict, lost: set) -> dict[str, dict[str, dict]]:
    """split -> key -> {ref_id: [sentence texts]} that the shards must hold, from the source objects alone."""
    good: dict[str, dict[str, dict]] = {}
    for ref in fx["refs"]:
        if ref["ref_id"] in lost:
            continue
        texts = [s["sent"] if s["sent"].strip() else s["raw"] for s in ref["sentences"]
                 if isinstance(s, dict) and (s["sent"].strip() or s["raw"].strip())]
        key = f"img{ref['image_id']:012d}"
        good.setdefault(ref["split"], {}).setdefault(key, {})[ref["ref_id"]] = texts
    return good


def stored_refcoco(out: Path) -> dict[str, dict[str, dict]]:
    stored: dict[str, dict[str, dict]] = {}
    for split, samples in read_samples(out).items():
        for key, files in samples.items():
            doc = json.loads(files["json"])
            assert sorted(files) == ["jpg", "json"]
            with Image.open(io.BytesIO(files["jpg"])) as image:
                assert image.format == "JPEG" and image.size == (doc["width"], doc["height"])
            for ref in doc["refs"]:
                assert ref["mask"]["size"] == [doc["height"], doc["width"]]
            stored.setdefault(split, {})[key] = {r["ref_id"]: [s["text"] for s in r["sentences"]] for r in doc["refs"]}
    return stored


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def stored_captions(out: Path) -> dict[str, list[str]]:
    """source path -> captions, from the tars; also checks each sample's three files agree."""
    stored = {}
    for key, files in read_samples(out).get("train", {}).items():
        assert sorted(files) == ["jpg", "json", "txt"], key
        doc = json.loads(files["json"])
        assert files["txt"].decode("utf-8") == doc["captions"][0]
        with Image.open(io.BytesIO(files["jpg"])) as image:
            assert image.size == (doc["width"], doc["height"])
        stored[doc["source"]] = doc["captions"]
    return stored


GOOD_ROWS = [("img/one.jpg", "first"), ("img/two words, comma.png", 'second "quoted"'), ("img/one.jpg", "first again"),
             ("./three.jpg", "third, with a comma")]


GOOD_TABLE = {"img/one.jpg": ["first", "first again"], "img/two words, comma.png": ['second "quoted"'],
              "three.jpg": ["third, with a comma"]}


def make_table_root(root: Path) -> None:
    put(root / "img" / "one.jpg", image_bytes(14, 10))
    put(root / "img" / "two words, comma.png", image_bytes(10, 14, "PNG"))
    put(root / "three.jpg", image_bytes(9, 9))


def write_csv(path: Path, rows: list[tuple]) -> Path:
    """CSV with proper quoting; a bytes cell is written as raw bytes (for non-UTF-8 cases)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([("image", "caption")] + [r for r in rows if not any(
        isinstance(cell, bytes) for cell in r)])
    data = text.getvalue().encode("utf-8")
    for row in rows:
        if any(isinstance(cell, bytes) for cell in row):
            data += b",".join(c if isinstance(c, bytes) else c.encode("utf-8") for c in row) + b"\n"
    path.write_bytes(data)
    return path

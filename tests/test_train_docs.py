"""docs/training.md documents every config field, and the shipped configs load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sgmodel.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_in_the_training_docs_table():
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", (ROOT / "docs" / "training.md").read_text(), flags=re.M))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert sorted(fields - documented) == []  # add a row to docs/training.md for each new field
    assert sorted(documented - fields) == []  # and no row for a field that no longer exists


@pytest.mark.parametrize("name", ["tiny.yaml", "refcoco.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_refcoco_config_keeps_the_paper_recipe():
    cfg, paper = load_config(ROOT / "configs" / "refcoco.yaml"), Config()
    for name in ("image_size", "dim", "slot_groups", "slots_per_group", "slot_iters", "lr", "batch_size", "epochs",
                 "grad_clip", "warmup_steps", "weight_decay", "backbone_lr_scale", "recon_weight"):
        assert getattr(cfg, name) == getattr(paper, name), name

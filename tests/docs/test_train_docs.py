"""docs/training.md documents every config field, and the shipped configs load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sgmodel.config import SECTIONS, Config, load_config, resumable_fields

ROOT = Path(__file__).resolve().parents[2]


def _documented_sections() -> dict[str, dict[str, str]]:
    """docs/training.md's config tables: {section heading name: {field: its row}}."""
    text = (ROOT / "docs" / "training.md").read_text().split("## Config fields", 1)[1]
    sections: dict[str, dict[str, str]] = {}
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        name = re.match(r"`([a-z_]+)`", block).group(1)
        sections[name] = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_0-9]+)` \|.*$", block, flags=re.M)}
    return sections


def test_every_config_field_is_in_the_training_docs_table_of_its_section():
    documented = _documented_sections()
    assert list(documented) == list(SECTIONS)  # one table per section, in the dataclass's order
    for section, cls in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert sorted(set(fields) - set(documented[section])) == [], section  # add a row for each new field
        assert sorted(set(documented[section]) - set(fields)) == [], section  # and none for a field that is gone


def test_the_docs_mark_exactly_the_fields_a_resume_may_change():
    marked = {name for rows in _documented_sections().values() for name, row in rows.items() if "| resume ·" in row}
    assert marked == set(resumable_fields())


@pytest.mark.parametrize("name", ["tiny.yaml", "refcoco.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_refcoco_config_keeps_the_paper_recipe():
    cfg, paper = load_config(ROOT / "configs" / "refcoco.yaml"), Config()
    for name in ("image_size", "dim", "slot_groups", "slots_per_group", "slot_iters", "lr", "batch_size", "epochs",
                 "grad_clip", "warmup_steps", "weight_decay", "backbone_lr_scale", "recon_weight"):
        assert getattr(cfg, name) == getattr(paper, name), name

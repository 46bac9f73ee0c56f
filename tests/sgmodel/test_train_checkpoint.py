"""Checkpoints: atomic writes, clear errors for bad files, model mismatch, RNG round-trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sgdata.format.errors import UserError
from sgmodel import checkpoint as ckpt
from sgmodel.checkpoint import config_from_checkpoint, load_checkpoint, load_model_state, restore_rng_states, rng_states, save_checkpoint
from sgmodel.config import Config, SlotConfig


def _model(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))


def _save(path, model, step):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return save_checkpoint(path, cfg=Config(slots=SlotConfig(dim=32)), step=step, epoch=0, model=model, optimizer=opt)


def test_roundtrip_holds_everything_a_resume_needs(tmp_path):
    model = _model()
    _save(tmp_path / "checkpoint.pt", model, 7)
    state = load_checkpoint(tmp_path)  # a run folder names its checkpoint.pt
    assert state["step"] == 7 and state["sgmodel_version"]
    assert set(state) >= {"config", "model", "optimizer", "scheduler", "rng", "feature_stats"}
    assert config_from_checkpoint(state).dim == 32
    fresh = _model()
    load_model_state(fresh, state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_write_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    _save(path, _model(), 5)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, _model(), 10)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "corrupt, truncated or not a checkpoint"),
        (b"\x00garbage" * 50, "corrupt, truncated or not a checkpoint"),
        ("dict", "is not an sgmodel checkpoint"),
        ("truncated", "corrupt, truncated or not a checkpoint"),
    ],
)
def test_bad_files_give_one_sentence(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    if content == "dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content == "truncated":
        _save(path, _model(), 1)
        path.write_bytes(path.read_bytes()[:-200])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(path)
    assert len(str(info.value).splitlines()) == 1


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    _save(tmp_path / "c.pt", _model(4), 1)
    with pytest.raises(UserError, match=r"0\.weight is \(4, 3\) in the checkpoint but \(8, 3\) in the model"):
        load_model_state(_model(8), load_checkpoint(tmp_path / "c.pt"))


def test_rng_states_round_trip():
    states = rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    restore_rng_states(states)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])

"""The trainer in one process: resume continues exactly, NaN policy, config rules, the lr schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sgmodel.checkpoint import load_checkpoint
from sgmodel.model import ShatterAndGather
from sgmodel.train import lr_factor, main
from tests.helpers.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the trainer catches it."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train_shards")
    write_shards(folder, [9, 8, 7], seed=4)
    return str(folder)


def _run(shards: str, out: Path, *extra: str) -> int:
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", shards, "--out", str(out),
            "--batch-size", "4", "--max-texts-per-image", "2", *extra]
    return main(argv)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _fail_on_call(monkeypatch, call: int, effect: str) -> None:
    """Patch the model's forward so its `call`-th invocation is killed or returns a NaN loss."""
    original = ShatterAndGather.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            if effect == "kill":
                raise Killed
            out = original(self, batch)
            return {**out, "loss": out["loss"] * float("nan")}
        return original(self, batch)

    monkeypatch.setattr(ShatterAndGather, "forward", forward)


def test_lr_warms_up_then_follows_a_cosine_to_zero():
    factors = [lr_factor(s, 4, 12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:]))  # then strictly decreasing
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)


def test_resume_after_a_kill_continues_the_run_exactly(shards, tmp_path, monkeypatch):
    """6 uninterrupted steps == killed at step 4 (checkpoint at 2, mid-epoch) + --resume: same steps, lr and losses."""
    run = ("--max-steps", "6", "--batch-size", "8", "--checkpoint-every", "2")  # 24 samples: 3 steps per epoch
    assert _run(shards, tmp_path / "full", *run) == 0
    full = _log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 7))
    assert [r["epoch"] for r in full] == [0, 0, 0, 1, 1, 1]

    with monkeypatch.context() as patch:
        _fail_on_call(patch, 4, "kill")
        with pytest.raises(Killed):
            _run(shards, tmp_path / "killed", *run)
    assert [r["step"] for r in _log(tmp_path / "killed")] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 2
    with open(tmp_path / "killed" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line the kill cut short

    assert _run(shards, tmp_path / "killed", *run, "--resume") == 0
    resumed = _log(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # step 3 written before the kill is not repeated
    for a, b in zip(full, resumed):
        assert a["lr"] == b["lr"] and a["epoch"] == b["epoch"]
        for name in ("loss", "contrastive", "reconstruction", "accuracy"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), (a["step"], name)
    final = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    reference = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert final["step"] == 6 and final["epoch"] == 2
    assert final["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"] == 6
    for name, tensor in reference["model"].items():
        assert torch.allclose(tensor.float(), final["model"][name].float(), atol=1e-5), name
    assert (tmp_path / "killed" / "config.yaml").is_file()
    assert list((tmp_path / "killed" / "tensorboard").iterdir())


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, capsys):
    _fail_on_call(monkeypatch, 5, "nan")
    code = _run(shards, tmp_path / "run", "--max-steps", "8", "--checkpoint-every", "2")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 5" in err and "still holds step 4" in err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4
    assert all(math.isfinite(t.float().sum()) for t in state["model"].values())
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3, 4]


def test_nan_loss_is_skipped_when_configured(shards, tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, 3, "nan")
    assert _run(shards, tmp_path / "run", "--max-steps", "5", "--nan-policy", "skip", "--log-every", "2") == 0
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [2, 3, 4, 5]  # the skipped step is logged even off the log interval
    skipped = log[1]
    assert skipped["skipped"] is True and skipped["loss"] is None
    assert all(r["loss"] is not None and "skipped" not in r for r in log if r["step"] != 3)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 5
    assert all(math.isfinite(t.float().sum()) for t in state["model"].values())


def test_run_folder_rules(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(shards, out, "--max-steps", "2") == 0
    assert _run(shards, out, "--max-steps", "4") == 2  # a second run may not overwrite the first
    assert "pass --resume" in capsys.readouterr().err
    assert _run(shards, out, "--max-steps", "4", "--resume", "--dim", "32") == 2  # model shape is the checkpoint's
    err = capsys.readouterr().err.strip()
    assert "dim is 64, not 32" in err and len(err.splitlines()) == 1
    assert _run(shards, out, "--max-steps", "3", "--resume") == 0  # run fields may change
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert _run(shards, out, "--max-steps", "3", "--no-such-field", "1") == 2
    assert "unknown config field" in capsys.readouterr().err


def test_empty_shard_spec_is_one_line(tmp_path, capsys):
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no shards match") and len(err.splitlines()) == 1

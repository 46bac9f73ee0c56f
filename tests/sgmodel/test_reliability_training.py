"""Interrupted training beyond tests/sgmodel/test_train*.py: a real SIGKILL inside a checkpoint write, and a
checkpoint file that tries to run code.

tests/sgmodel/test_train_checkpoint.py makes `torch.save` raise half-way (the cleanup path); here the process
is killed by the kernel half-way through writing the file, so no cleanup runs at all: the last good
checkpoint must still be the one a resume reads, and the resumed run must log every step once with
the same learning rates and losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgdata.format.errors import UserError
from sgmodel.checkpoint import load_checkpoint
from sgmodel.train import main as train_main
from tests.helpers.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]

# Installed as sitecustomize in the child: the Nth torch.save writes half its bytes, fsyncs them and
# SIGKILLs its own process, as a power cut or an OOM kill in the middle of a checkpoint write would.
KILL_IN_SAVE = '''
import io, os, signal
_target = int(os.environ.get("KILL_IN_TORCH_SAVE", "0"))
if _target:
    import torch
    _real_save, _calls = torch.save, [0]

    def _save(obj, f, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] < _target or isinstance(f, (str, os.PathLike)):
            return _real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = _save
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, [9, 8, 7], seed=4)
    return str(folder)


def _args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", shards, "--out", str(out),
            "--batch-size", "4", "--max-texts-per-image", "2", "--max-steps", "6", "--checkpoint-every", "2", *extra]


def _train_killed_in_save(shards: str, out: Path, hooks: Path, save: int) -> subprocess.CompletedProcess:
    """A real process (only a real one can be SIGKILLed) whose `save`-th torch.save dies half-way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "KILL_IN_TORCH_SAVE": str(save)}
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "sgmodel.train", *_args(shards, out)], env=env,
                          capture_output=True, text=True, timeout=300)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def test_sigkill_inside_a_checkpoint_write_keeps_the_last_good_one_and_resume_matches(shards, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_IN_SAVE)

    full = tmp_path / "full"
    assert train_main(_args(shards, full)) == 0  # the uninterrupted reference, in this process

    run = tmp_path / "run"
    killed = _train_killed_in_save(shards, run, hooks, save=2)  # the checkpoint of step 4 dies half-written
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p.name for p in run.iterdir() if "checkpoint.pt" in p.name]
    assert "checkpoint.pt" in leftovers and len(leftovers) == 2  # the good one and the torn temporary
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2  # the torn write replaced nothing

    assert train_main(_args(shards, run, "--resume")) == 0
    reference, resumed = _log(full), _log(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))  # no gap, no repeat
    for a, b in zip(reference, resumed):
        assert a["lr"] == b["lr"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    final, expected = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert final["step"] == 6
    for name, tensor in expected["model"].items():
        assert torch.allclose(tensor.float(), final["model"][name].float(), atol=1e-5), name
    assert sorted(p.name for p in run.iterdir() if "checkpoint.pt" in p.name) == ["checkpoint.pt"]  # the torn one removed


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("write", ["torch_save", "raw_pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, write):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    payload = {"format": "looks fine", "model": _RunsCode(marker)}
    if write == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="cannot be read") as caught:
        load_checkpoint(path)
    assert len(str(caught.value).splitlines()) == 1
    assert not marker.exists()

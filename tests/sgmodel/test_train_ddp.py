"""End to end on real sgdata shards: 2-rank torchrun (gloo, CPU) trains, is killed, resumes, then evaluate and predict.

This is the multi-process integration proof and the interrupted-training check: the run is SIGKILLed after
a checkpoint, `--resume` continues from that checkpoint's step, and log.jsonl ends up with every step
exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sgmodel.checkpoint import load_checkpoint
from sgmodel.evaluate import main as evaluate_main
from sgmodel.predict import main as predict_main
from sgmodel.train import lr_factor

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    from sgdata import api
    from sgdata.synth import generate_refer_dataset

    root = tmp_path_factory.mktemp("ddp")
    raw = generate_refer_dataset(root / "raw", images=24, seed=0, progress=False)
    api.build_refcoco(raw, raw / "images", "synthref", "unc", root / "shards", workers=0, shard_size=5)
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(out: Path, shards: Path, *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "sgmodel.train",
            "--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", str(shards / "train"),
            "--out", str(out), "--batch-size", "4", "--checkpoint-every", "3", *extra]


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (torchrun starts its ranks in sessions of their own)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [d for c in children for d in [c, *_descendants(c)]]


def _kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, like a lost node or `scancel --signal=KILL`."""
    for pid in [*_descendants(job.pid), job.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed beside this Python")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finding the ranks to kill reads /proc (Linux)")
def test_two_rank_training_survives_a_kill_then_evaluates_and_predicts(synth_shards, tmp_path):
    shards, run = synth_shards / "shards", tmp_path / "run"

    # 1. train on 2 ranks; SIGKILL the whole job once a checkpoint exists and a later step was logged
    stderr_file = open(tmp_path / "first-run.err", "wb")
    job = subprocess.Popen(_torchrun(run, shards, "--max-steps", "200"), env=_env(), stdout=subprocess.DEVNULL, stderr=stderr_file)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and job.poll() is None:
            if (run / "checkpoint.pt").exists() and _steps(run) and _steps(run)[-1] > 3:
                break
            time.sleep(0.05)
    finally:
        if job.poll() is None:
            _kill_job(job)
        job.wait(timeout=30)
        stderr_file.close()
    err = (tmp_path / "first-run.err").read_text(errors="replace")
    assert job.returncode != 0 and (run / "checkpoint.pt").exists(), err[-2000:]
    saved = load_checkpoint(run / "checkpoint.pt")["step"]
    logged = _steps(run)
    assert saved % 3 == 0 and saved >= 3 and logged == list(range(1, logged[-1] + 1))

    # 2. resume: continues from the checkpoint's step, log.jsonl has every step once
    target = saved + 3
    done = subprocess.run(_torchrun(run, shards, "--max-steps", str(target), "--resume"), env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, target + 1))
    for record in log[saved:]:  # the resumed steps follow the (new) schedule from the restored scheduler
        assert record["lr"] == pytest.approx(1e-3 * lr_factor(record["step"] - 1, 5, target))
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == target and len(state["extra"]["rng_per_rank"]) == 2

    # 3. evaluate the checkpoint on the val split (in this process: the entry points' main() functions)
    metrics = tmp_path / "metrics.json"
    checkpoint = str(run / "checkpoint.pt")
    assert evaluate_main(["--checkpoint", checkpoint, "--shards", str(shards / "val"), "--out", str(metrics), "--save-overlays", "1"]) == 0
    record = json.loads(metrics.read_text())
    assert set(record["metrics"]) == {"mIoU", "cIoU", "PointM", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"}
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert record["count"] > 0 and record["split"] == "val" and record["step"] == target

    # 4. predict on an original image: the mask has the image's size
    image = sorted((synth_shards / "raw" / "images").glob("*.jpg"))[0]
    mask = tmp_path / "mask.png"
    assert predict_main(["--checkpoint", checkpoint, "--image", str(image), "--text", "the red circle", "--out", str(mask)]) == 0
    assert Image.open(mask).size == Image.open(image).size
    assert (tmp_path / "mask-overlay.png").is_file()


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed beside this Python")
def test_two_ranks_share_the_feature_cache_build(synth_shards, tmp_path):
    """Frozen encoders under torchrun: the ranks split the cache build, wait at a barrier, then train on it."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    frozen = ["--freeze-image-encoder", "true", "--freeze-text-encoder", "true", "--standardize-features", "true",
              "--feature-cache", str(cache), "--max-steps", "2"]
    done = subprocess.run(_torchrun(run, synth_shards / "shards", *frozen), env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted((synth_shards / "shards" / "train").glob("*.tar"))
    assert len(list((cache / "image").rglob("*.pt"))) == len(list((cache / "text").rglob("*.pt"))) == len(shards) == 4
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 2 and state["feature_stats"] is not None


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed beside this Python")
def test_two_ranks_train_with_the_coreference_term_and_shared_negatives(synth_shards, tmp_path):
    """The relations recipe under DDP: geometry travels with the gathered slots, every rank's term is logged."""
    run = tmp_path / "run"
    options = ["--coreference-weight", "1.0", "--slot-geometry", "true", "--text-word-embedding", "true",
               "--gather-negatives", "true", "--drop-duplicate-negatives", "true", "--max-steps", "4", "--log-every", "1"]
    done = subprocess.run(_torchrun(run, synth_shards / "shards", *options), env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["coreference"] is not None and r["coreference"] >= 0 for r in log)
    assert any(r["coreference"] > 0 for r in log)  # the synthetic refs pair relational with attribute phrases
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4

"""The GPU path (marker `gpu`, skipped without CUDA; benchmarks/gpu_check.sh runs these on a GPU machine).

- a 1-rank torchrun on NCCL trains the demo recipe and the paper configuration (random weights, compiled
  stages, bf16) for 20 steps with finite losses and a checkpoint, then resumes at exactly step 20 and
  trains to 30: the log continues without gap or repeat and the optimizer has counted 30 steps;
- steady-state training steps of the paper configuration (pinned batch copied in, compiled stages,
  bf16, fused AdamW) run under torch.cuda.set_sync_debug_mode("error"): no step waits for the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import child_env
from sgmodel.checkpoint import load_checkpoint
from tests.helpers.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RECIPES = {
    # name: (trainer arguments, needs the demo extra)
    "demo": (["--config", "configs/demo.yaml", "--batch-size", "16"], True),
    "paper": (["--config", "configs/refcoco.yaml", "--batch-size", "8", "--workers", "2", "--compile", "true"], False),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gpu_shards")
    write_shards(folder, [24, 24, 24, 24], seed=3)
    return str(folder)


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "sgmodel.train", *args]
    return subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_rank_nccl_trains_checkpoints_and_resumes_at_the_exact_step(recipe, shards, tmp_path):
    args, needs_demo = RECIPES[recipe]
    if needs_demo and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("the demo recipe needs the demo extra: pip install -e '.[demo]'")
    out = tmp_path / "run"
    common = [*args, "--train-shards", shards, "--out", str(out), "--feature-cache", str(tmp_path / "features"), "--log-every", "5"]
    first = _torchrun([*common, "--max-steps", "20", "--checkpoint-every", "10"], timeout=420)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "on cuda:0 (nccl, bf16)" in first.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 20

    second = _torchrun([*common, "--max-steps", "30", "--checkpoint-every", "10", "--resume"], timeout=420)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 20 on cuda:0" in second.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) and "skipped" not in r for r in log)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 30 and state["scheduler"]["last_epoch"] == 30
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {30}
    assert all(torch.isfinite(t.float()).all() for t in state["model"].values())


def test_steady_state_steps_never_wait_for_the_gpu():
    from benchmarks.gpu_step import SgmodelSide, random_inputs
    from sgmodel.train import to_device

    device = torch.device("cuda")
    side = SgmodelSide("paper", device, "default")
    images, ids, mask = random_inputs(side.cfg, side.vocab, side.length, 8)
    side.compile()
    on_host = side.batch(images, ids, mask)  # on the device; brought back and pinned, as the loader hands it over
    pinned = {k: v.cpu().pin_memory() if isinstance(v, torch.Tensor) else v for k, v in on_host.items()}
    losses = [side.step(to_device(pinned, device)) for _ in range(3)]  # compiling happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses += [side.step(to_device(pinned, device)) for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()

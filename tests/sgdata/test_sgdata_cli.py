"""The `sgdata` command line: every subcommand, its --help, user errors, and kill -9 of a real build.

The kill test runs `python -m sgdata build ... --workers 2` (a local Ray) in its own session, kills
the whole process group at several points, reruns the same command, and compares checksums with a
clean build. A `sitecustomize` on PYTHONPATH slows each sample down in the driver and in every Ray
worker, so the kill points (Ray starting, a shard half-written, some shards done) are reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdata import api
from sgdata.cli import app
from sgdata.format import caption_tile, is_temporary, make_grid, overlay_mask
from sgdata.verify import verify_dataset
from tests.helpers.processes import session_processes, slow_samples_pythonpath
from tests.helpers.refer_fixture import make_refer_fixture

runner = CliRunner()


def tar_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


def refcoco_args(refer, out: Path, *extra: str) -> list[str]:
    return ["build", "refcoco", "--refer-root", str(refer["refer_root"]), "--images", str(refer["images_dir"]),
            "--dataset", "refcoco", "--split-by", "unc", "--out", str(out), *extra]


@pytest.mark.parametrize("command, must_mention", [
    ([], ["build", "inspect", "verify", "synth"]),
    (["build"], ["refcoco", "captions", "phrasecut"]),
    (["build", "refcoco"], ["--refer-root", "--images", "--dataset", "--split-by", "--splits", "--out", "--workers",
                            "--ray-address", "--max-size", "--shard-size", "--overwrite", "--hub-parquet", "--hub-repo",
                            "--revision"]),
    (["build", "phrasecut"], ["--root", "--splits", "--out", "--workers", "--max-size"]),
    (["build", "captions"], ["SRC", "--out", "--workers", "--ray-address", "--max-size"]),
    (["inspect"], ["SHARDS", "--render"]),
    (["verify"], ["OUT"]),
    (["synth"], ["OUT", "--images", "--seed"]),
])
def test_every_command_has_help(command, must_mention):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    for word in must_mention:
        assert word in result.output


def test_build_inspect_verify(refer, tmp_path):
    out = tmp_path / "out"
    args = refcoco_args(refer, out, "--workers", "0", "--shard-size", "2", "--splits", "train,val")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "dataset.json").read_text())
    assert sorted(card["splits"]) == ["train", "val"] and "train" in result.output and "val" in result.output

    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == sum(s["samples"] for s in card["splits"].values())
    assert report["extensions"] == {"jpg": report["samples"], "json": report["samples"]}
    assert report["texts"] == sum(s["texts"] for s in card["splits"].values())

    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["inspect", str(out / "train"), "--render", str(grid), "--n", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 2 * 256  # two tiles side by side

    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0 and "OK" in result.stdout
    (out / "val" / "val-000000.tar").write_bytes(b"")
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1 and "val/val-000000.tar" in result.stdout


@pytest.mark.parametrize("args_of, message", [
    (lambda refer, tmp: ["build", "refcoco", "--refer-root", str(tmp / "nowhere"), "--images", str(tmp),
                         "--dataset", "refcoco", "--split-by", "unc", "--out", str(tmp / "o")], None),
    (lambda refer, tmp: refcoco_args(refer, tmp / "o", "--dataset", "refcocoz"), None),
    (lambda refer, tmp: refcoco_args(refer, tmp / "o", "--workers", "0", "--shard-size", "0"), "--shard-size"),
    (lambda refer, tmp: refcoco_args(refer, tmp / "o", "--workers", "0", "--max-size", "-3"), "--max-size"),
    (lambda refer, tmp: refcoco_args(refer, tmp / "o", "--workers", "0", "--ray-address", "auto"), "in-process"),
    (lambda refer, tmp: ["build", "captions", str(tmp / "no_captions"), "--out", str(tmp / "o")], None),
    (lambda refer, tmp: ["verify", str(tmp / "nothing")], "not a folder"),
    (lambda refer, tmp: ["inspect", str(tmp / "nothing-*.tar")], "no shards match"),
], ids=["missing-root", "unknown-dataset", "shard-size", "max-size", "workers-and-address", "missing-captions",
        "verify-nothing", "inspect-nothing"])
def test_user_errors_are_one_sentence_and_exit_2(refer, tmp_path, args_of, message):
    result = runner.invoke(app, args_of(refer, tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgdata: ") and "Traceback" not in result.output
    if message:
        assert message in lines[0]


def test_a_different_command_on_the_same_out_needs_overwrite(refer, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, refcoco_args(refer, out, "--workers", "0", "--splits", "val")).exit_code == 0
    result = runner.invoke(app, refcoco_args(refer, out, "--workers", "0", "--splits", "val", "--max-size", "32"))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    result = runner.invoke(app, refcoco_args(refer, out, "--workers", "0", "--splits", "val", "--max-size", "32",
                                             "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dataset.json").read_text())["options"]["max_size"] == 32


def test_build_captions_from_a_folder(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(src / f"photo {i}.jpg")
        (src / f"photo {i}.txt").write_text(f"a photo number {i}\nanother caption {i}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["build", "captions", str(src), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "dataset.json").read_text())
    assert card["kind"] == "captions" and card["splits"]["train"]["samples"] == 3
    report = api.inspect(out / "train")
    assert report["extensions"] == {"jpg": 3, "json": 3, "txt": 3}
    assert sorted(t for e in api.inspect(out, examples=3)["examples"] for t in e["texts"]) == sorted(
        [f"a photo number {i}" for i in range(3)] + [f"another caption {i}" for i in range(3)])
    assert verify_dataset(out) == []


def test_synth_writes_a_refer_dataset_the_builder_reads(tmp_path):
    pytest.importorskip("sgdata.synth")
    result = runner.invoke(app, ["synth", str(tmp_path / "synth"), "--images", "6", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "sgdata build refcoco" in result.stdout
    summary = api.build_refcoco(tmp_path / "synth", tmp_path / "synth" / "images", "synthref", "unc",
                                tmp_path / "out", workers=0)
    assert sum(s["samples"] for s in summary["splits"].values()) == 6 and summary["failed_shards"] == []


# ---------------------------------------------------------------- drawing helpers


def test_overlay_mask_tints_only_the_mask():
    image = Image.new("RGB", (8, 6), (100, 100, 100))
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:5, 3:7] = True
    out = np.asarray(overlay_mask(image, mask, (255, 0, 0), alpha=0.5, outline=False)).astype(int)
    assert (out[~mask] == 100).all()
    assert (out[mask][:, 0] > 150).all() and (out[mask][:, 1] < 100).all()
    soft = np.asarray(overlay_mask(image, np.full((3, 4), 0.5, dtype=np.float32), (255, 0, 0), outline=False))
    assert soft.shape == (6, 8, 3) and 100 < int(soft[0, 0, 0]) < 255 * 0.5 + 100 * 0.5  # resized, half strength


def test_caption_tile_and_grid_sizes():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    short = caption_tile(image, ["one line"], width=120)
    long = caption_tile(image, [("a much longer phrase " * 4, (255, 0, 0)), "second"], width=120)
    assert short.width == long.width == 120 and long.height > short.height > 60
    grid = make_grid([short, long, short], cols=2, pad=2)
    assert grid.size == (2 * 120 + 3 * 2, 2 * long.height + 3 * 2)


# ---------------------------------------------------------------- kill -9 and resume

def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the build's process group, then make sure nothing of its session (Ray included) survives."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(proc.pid)
    for pid in left:  # these are processes this test started
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes of the killed build outlived it: {left}"


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the build ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            _kill_session(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_kill_9_at_several_points_then_resume_matches_a_clean_build(refer, tmp_path):
    clean = tmp_path / "clean"
    api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", clean, workers=0, shard_size=1)
    expected = tar_hashes(clean)
    assert len(expected) == 6

    ray_tmp = tempfile.mkdtemp(prefix="sgr", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=slow_samples_pythonpath(tmp_path / "hooks", env.get("PYTHONPATH", "")),
               SGDATA_TEST_SAMPLE_DELAY="1.0", RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "out"
    # One Ray worker: shards finish one at a time, so the kill in step 3 cannot land after two shards that
    # happened to finish in the same instant (with two workers that left nothing to resume on a busy CI machine).
    command = [sys.executable, "-m", "sgdata", *refcoco_args(refer, out, "--workers", "1", "--shard-size", "1")]

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def final_tars() -> list[Path]:
        return sorted(out.glob("*/*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))

    def temp_tars() -> list[Path]:
        return [p for p in out.glob("*/.*") if is_temporary(p.name) and ".tar" in p.name]

    def check_final_tars_whole() -> None:
        """The invariant: whatever a kill interrupted, every tar under its final name is complete."""
        for tar in final_tars():
            rel = str(tar.relative_to(out))
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == expected[rel], f"{rel} is partial or wrong"

    try:
        # 1. while Ray starts: the build record exists, no shard yet
        proc = start()
        _wait_for(lambda: (out / ".build.json").exists(), proc, "the build record")
        _kill_session(proc)
        check_final_tars_whole()

        # 2. in the middle of writing a shard
        proc = start()
        _wait_for(lambda: bool(temp_tars()), proc, "a shard being written")
        _kill_session(proc)
        check_final_tars_whole()

        # 3. after another shard is done, with others still to do
        done_before = len(final_tars())
        proc = start()
        _wait_for(lambda: len(final_tars()) > done_before, proc, "another finished shard")
        _kill_session(proc)
        check_final_tars_whole()
        assert len(final_tars()) < len(expected), "the build finished before it could be killed"

        # 4. the same command to the end
        proc = start()
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]
        assert session_processes(proc.pid) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert tar_hashes(out) == expected
    assert verify_dataset(out) == []
    assert [p for p in out.rglob("*") if is_temporary(p.name)] == []

"""Shards on object storage, against a real S3-compatible server on 127.0.0.1 (tests/helpers/s3_server.py).

What a local build promises holds for `--out s3://bucket/prefix`: the same tar bytes, index files,
`verify`, resume after SIGKILL with every tar under its final key whole, a damaged shard found and
redone; `sgdata inspect` and `sgmodel train/evaluate` read the bucket directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers.processes import slow_samples_pythonpath
from tests.helpers.refer_fixture import make_refer_fixture
from tests.helpers.s3_server import s3_server
from sgdata import api
from sgdata.cli import app
from sgdata.format import UserError, expand_shards

BUCKET = "sgtest"


@pytest.fixture(scope="module")
def s3():
    """The server's environment, set in this process (and inherited by the subprocesses started here)."""
    import s3fs

    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def local_hashes(refer, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", out, workers=0, shard_size=1)
    return {str(p.relative_to(out)): _sha(p.read_bytes()) for p in sorted(out.rglob("*.tar"))}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bucket_tars(fs, prefix: str) -> dict[str, str]:
    """{split/name.tar: sha256} of every tar under its final key."""
    root = f"{BUCKET}/{prefix}"
    return {key[len(root) + 1:]: _sha(fs.cat_file(key)) for key in sorted(fs.find(root))
            if key.endswith(".tar") and not key.rpartition("/")[2].startswith(".")}


def build_args(refer, out: str, *extra: str) -> list[str]:
    return ["build", "refcoco", "--refer-root", str(refer["refer_root"]), "--images", str(refer["images_dir"]),
            "--dataset", "refcoco", "--split-by", "unc", "--out", out, *extra]


def test_build_to_s3_matches_local_bytes_verifies_and_redoes_a_damaged_shard(s3, refer, local_hashes):
    url = f"s3://{BUCKET}/built"
    summary = api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", url, workers=0,
                                shard_size=1)
    assert summary["out"] == url and summary["shards_written"] == 6
    assert bucket_tars(s3, "built") == local_hashes
    for name in ("dataset.json", "failures.jsonl", ".build.json", "train/manifest.parquet", "train/sizes.json",
                 "train/parts/train-000000.json"):
        assert s3.isfile(f"{BUCKET}/built/{name}"), name
    assert [k for k in s3.find(f"{BUCKET}/built") if ".tmp-" in k] == []

    runner = CliRunner()
    result = runner.invoke(app, ["verify", url])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"{url}: OK")
    result = runner.invoke(app, ["inspect", f"{url}/train", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_shards"] == 2 and report["samples"] == 2
    assert report["shards"] == [f"{url}/train/train-00000{i}.tar" for i in range(2)]
    assert report["bytes"] == sum(s3.size(f"{BUCKET}/built/train/train-00000{i}.tar") for i in range(2))

    # a shard replaced by half of itself: verify names it, the same command redoes only it
    key = f"{BUCKET}/built/val/val-000000.tar"
    s3.pipe(key, s3.cat_file(key)[:700])
    problems = api.verify(url)
    assert problems and all(p.startswith("val/val-000000.tar") for p in problems), problems
    again = api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", url, workers=0, shard_size=1)
    assert (again["shards_written"], again["shards_kept"]) == (1, 5)
    assert bucket_tars(s3, "built") == local_hashes
    assert api.verify(url) == []


def test_shard_specs_on_s3_list_prefixes_globs_and_brace_patterns(s3, refer):
    url = f"s3://{BUCKET}/specs"
    api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", url, workers=0, shard_size=1,
                      splits="val,testB")
    val = [f"{url}/val/val-000000.tar"]
    testb = [f"{url}/testB/testB-00000{i}.tar" for i in range(2)]
    assert expand_shards(url) == testb + val  # a dataset prefix: its card's splits
    assert expand_shards(f"{url}/testB") == testb
    assert expand_shards(f"{url}/*/*-000000.tar") == [testb[0], val[0]]
    assert expand_shards(f"{url}/testB/testB-{{000000..000001}}.tar") == testb
    with pytest.raises(UserError, match=r"shard s3://sgtest/specs/testB/testB-000002.tar does not exist"):
        expand_shards(f"{url}/testB/testB-{{000000..000002}}.tar")


def test_sigkill_mid_build_then_resume_on_s3(s3, refer, local_hashes, tmp_path):
    env = dict(os.environ, SGDATA_TEST_SAMPLE_DELAY="0.7",
               PYTHONPATH=slow_samples_pythonpath(tmp_path / "hooks", os.environ.get("PYTHONPATH", "")))
    url = f"s3://{BUCKET}/killed"
    command = [sys.executable, "-m", "sgdata", *build_args(refer, url, "--workers", "0", "--shard-size", "1")]

    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(bucket_tars(s3, "killed")) < 2:
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "no shard reached the bucket"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    partial = bucket_tars(s3, "killed")
    assert 2 <= len(partial) < len(local_hashes), "the build finished before it could be killed"
    assert all(local_hashes[name] == digest for name, digest in partial.items()), "a tar under its final key is not whole"
    assert not s3.isfile(f"{BUCKET}/killed/dataset.json")

    result = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert bucket_tars(s3, "killed") == local_hashes
    assert api.verify(url) == []


def test_train_and_evaluate_stream_from_s3(s3, refer, tmp_path):
    from sgmodel.evaluate import evaluate
    from sgmodel.train import main as train_main

    url = f"s3://{BUCKET}/train"
    api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", url, workers=0, shard_size=1)
    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    code = train_main(["--config", str(root / "configs" / "tiny.yaml"), "--train-shards", url, "--out", str(run),
                       "--batch-size", "2", "--max-texts-per-image", "2", "--max-steps", "2"])
    assert code == 0
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert [s["step"] for s in steps if "loss" in s][-1] == 2
    record = evaluate(str(run / "checkpoint.pt"), f"{url}/val,{url}/testB", batch_size=2)
    assert record["shards"] == f"{url}/val,{url}/testB"
    assert record["count"] > 0 and record["step"] == 2


def test_an_unreachable_endpoint_is_one_sentence(s3, tmp_path):
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    result = subprocess.run([sys.executable, "-m", "sgdata", "verify", f"s3://{BUCKET}/nothing"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sgdata: cannot reach s3://{BUCKET}/nothing"), result.stderr

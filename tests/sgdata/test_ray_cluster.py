"""Joining a real Ray cluster by address, as `ray start --head` runs one today (token authentication on),
and writing the shards to a bucket: the walk-through of docs/sgdata.md on one machine.

The head runs in its own HOME, temp dir, ports and process session, so it neither sees nor disturbs
another Ray on the machine; the fixture kills its whole session at the end, whatever happened. The
bucket is a real S3-compatible server on 127.0.0.1 (tests/helpers/s3_server.py); head, workers and driver
find it through the standard AWS_* variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.processes import session_processes
from tests.helpers.refer_fixture import make_refer_fixture
from tests.helpers.s3_server import free_port, s3_server
from sgdata import api

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the head's session (GCS, raylet, workers, agents): all started here."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _client_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def bucket():
    """The S3 server's environment (the head's workers need it too: they write the shards)."""
    import s3fs

    with s3_server() as env:
        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True,
                               endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir("cluster")
        yield env, fs


@pytest.fixture(scope="module")
def head(bucket):
    """`ray start --head` with a token in its HOME (as any earlier local Ray run leaves one): auth is on."""
    scratch = Path(tempfile.mkdtemp(prefix="sgh", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    home = scratch / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    port = free_port()
    command = [RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(scratch / "r"), "--num-cpus", "2", "--include-dashboard", "false",
               "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    log = open(scratch / "head.log", "wb")
    proc = subprocess.Popen(command, env=_client_env(home, **bucket[0]), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (scratch / "head.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the Ray head did not start:\n" + (scratch / "head.log").read_text()[-3000:])
            time.sleep(0.2)
        assert b"Token authentication is enabled" in (scratch / "head.log").read_bytes()
        yield {"address": f"127.0.0.1:{port}", "home": home}
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    return make_refer_fixture(tmp_path_factory.mktemp("refer"))


def _hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def _build(refer, out: str | Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sgdata", "build", "refcoco", "--refer-root", str(refer["refer_root"]),
               "--images", str(refer["images_dir"]), "--dataset", "refcoco", "--split-by", "unc",
               "--out", str(out), "--shard-size", "1", "--ray-address", address]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_build_joins_a_token_auth_head_by_address_and_writes_the_local_bytes_to_a_bucket(head, bucket, refer, tmp_path):
    local = tmp_path / "local"
    api.build_refcoco(refer["refer_root"], refer["images_dir"], "refcoco", "unc", local, workers=0, shard_size=1)

    env, fs = bucket
    url = "s3://cluster/refcoco"
    client = _client_env(head["home"], RAY_AUTH_MODE="token", **env)
    result = _build(refer, url, head["address"], client)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"runner": "RayRunner"' in fs.cat_file("cluster/refcoco/train/stats.json").decode()
    in_bucket = {key[len("cluster/refcoco/"):]: hashlib.sha256(fs.cat_file(key)).hexdigest()
                 for key in fs.find("cluster/refcoco") if key.endswith(".tar")}
    assert in_bucket == _hashes(local) and len(in_bucket) == 6
    verify = subprocess.run([sys.executable, "-m", "sgdata", "verify", url], env=client, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.strip() == f"{url}: OK", verify.stdout + verify.stderr


@pytest.mark.parametrize("env_extra, says", [
    ({}, "requires token authentication: set RAY_AUTH_MODE=token in this environment"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-cluster-token"}, "refused this machine's token"),
])
def test_a_client_the_head_will_not_take_gets_one_sentence(head, refer, tmp_path, env_extra, says):
    result = _build(refer, tmp_path / "out", head["address"], _client_env(head["home"], **env_extra))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]  # no InvalidAuthToken warning flood
    assert lines[0].startswith(f"sgdata: the Ray cluster at {head['address']} ") and says in lines[0]
    assert "~/.ray/auth_token" in lines[0]


def test_nothing_listening_at_the_address_is_one_sentence(refer, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result = _build(refer, tmp_path / "out", address, _client_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sgdata: no Ray cluster answers at {address} (is `ray start --head --port PORT` running there, and is "
        f"the port reachable from this machine?)."]

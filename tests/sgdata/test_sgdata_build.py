"""sgdata build stages: shard writer, runners (in-process and Ray), resume, refusal, merge, verify.

One in-process build and one 2-worker Ray build of the refer fixture are shared by the module
(Ray start-up costs seconds on a small machine); tests that damage or resume copy them first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sgdata import api
from sgdata.build import build, shard_tasks
from sgdata.format import SampleError, UserError, is_temporary, iter_tar_samples
from sgdata.runner import InProcessRunner, RayRunner, make_runner
from sgdata.samples import SampleOptions
from sgdata.sources.base import Finalized, SampleSpec, SourcePlan
from sgdata.sources.refcoco import plan_refcoco
from sgdata.verify import verify_dataset
from sgdata.writer import ShardTask, write_shard
from tests.helpers.refer_fixture import make_refer_fixture

BAD_IMAGE_ID = 522418  # a train image whose file is replaced by text: fails in the worker, not in planning


def tar_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if is_temporary(p.name)]


def manifest_rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    fx = make_refer_fixture(tmp_path_factory.mktemp("refer"), faults=("missing_annotation",))
    fx["image_paths"][BAD_IMAGE_ID].write_bytes(b"this is not an image")
    return fx


def build_fixture(source, out: Path, **kwargs) -> dict:
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("shard_size", 1)
    return api.build_refcoco(source["refer_root"], source["images_dir"], "refcoco", "unc", out, **kwargs)


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = build_fixture(source, out)
    assert summary["failed_shards"] == [] and summary["runner"] == "InProcessRunner"
    return out


@pytest.fixture(scope="module")
def ray_session():
    """One local 2-CPU Ray for the module; RayRunner uses a Ray it finds running and leaves it up."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the flaky stubs below travel by value
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_built(source, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ray") / "out"
    return out, build_fixture(source, out, workers=2)


def copy_of(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "copy"))


# ---------------------------------------------------------------- whole builds


def test_ray_build_is_byte_identical_to_in_process_build(clean, ray_built):
    out, summary = ray_built
    assert summary["runner"] == "RayRunner" and summary["failed_shards"] == []
    assert summary["shards_written"] == len(tar_hashes(clean)) > 4
    assert tar_hashes(out) == tar_hashes(clean)
    for split in ("train", "val", "testA", "testB"):
        assert manifest_rows(out, split) == manifest_rows(clean, split)
    def failures(root):
        return [{k: v for k, v in json.loads(line).items() if k != "detail"}  # details may quote object ids
                for line in (root / "failures.jsonl").read_text().splitlines()]

    assert failures(out) == failures(clean) and len(failures(out)) == 2
    assert verify_dataset(out) == []


def test_index_files_agree_with_the_shards(clean, source):
    card = json.loads((clean / "dataset.json").read_text())
    assert card["kind"] == "refcoco" and card["options"]["max_size"] is None and card["build"]["shard_size"] == 1
    failures = [json.loads(line) for line in (clean / "failures.jsonl").read_text().splitlines()]
    assert failures == sorted(failures, key=lambda f: (f["split"], f["path"], f["reason"], f["detail"]))
    assert any(f["path"] == str(source["image_paths"][BAD_IMAGE_ID]) and f["split"] == "train" for f in failures)
    assert any(f"ref_id={source['faults']['missing_annotation']}" in f["path"] for f in failures)
    assert card["failures"] == len(failures)

    for split, info in card["splits"].items():
        rows = manifest_rows(clean, split)
        by_shard: dict[str, list[str]] = {}
        for row in rows:
            by_shard.setdefault(row["shard"], []).append(row["key"])
        tars = sorted((clean / split).glob(f"{split}-*.tar"))
        assert info["shards"] == len(tars) and info["samples"] == len(rows) and info["complete"]
        for tar in tars:
            samples = list(iter_tar_samples(tar))
            assert [key for key, _ in samples] == by_shard.get(tar.name, [])
            for key, files in samples:
                assert sorted(files) == ["jpg", "json"] and "." not in key
                meta = json.loads(files["json"])
                row = next(r for r in rows if r["key"] == key)
                texts = [s["text"] for ref in meta["refs"] for s in ref["sentences"]]
                assert (row["width"], row["height"], row["texts"]) == (meta["width"], meta["height"], texts)
        sizes = json.loads((clean / split / "sizes.json").read_text())
        assert sizes == {tar.name: len(by_shard.get(tar.name, [])) for tar in tars}
        wids = json.loads((clean / split / "index.wids.json").read_text())
        assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
        assert {e["url"]: e["nsamples"] for e in wids["shardlist"]} == sizes
        assert all((clean / split / e["url"]).is_file() for e in wids["shardlist"])
        stats = json.loads((clean / split / "stats.json").read_text())
        split_failures = [f for f in failures if f["split"] == split]
        assert stats["failures"] == len(split_failures) == sum(stats["failures_by_reason"].values())
        assert stats["samples"] == len(rows) and stats["bytes"] == sum(t.stat().st_size for t in tars)
    train_rows = manifest_rows(clean, "train")
    assert [r["source_id"] for r in train_rows] == ["391895"]  # the bad image is skipped, its shard kept empty
    assert json.loads((clean / "train" / "sizes.json").read_text()) == {"train-000000.tar": 1, "train-000001.tar": 0}


def test_plain_webdataset_reads_every_sample(clean):
    import io

    from PIL import Image

    wds = pytest.importorskip("webdataset")

    for split in ("train", "val", "testA", "testB"):
        urls = [str(p) for p in sorted((clean / split).glob(f"{split}-*.tar"))]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        rows = manifest_rows(clean, split)
        assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
        for sample, row in zip(samples, rows):
            meta = json.loads(sample["json"])
            size = Image.open(io.BytesIO(sample["jpg"])).size
            assert size == (meta["width"], meta["height"]) == (row["width"], row["height"])


def test_hugging_face_datasets_loads_the_shards(clean, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    data_files = {split: [str(p) for p in sorted((clean / split).glob(f"{split}-*.tar"))] for split in ("val", "testB")}
    loaded = datasets.load_dataset("webdataset", data_files=data_files, cache_dir=str(tmp_path / "hf"))
    for split in data_files:
        rows = manifest_rows(clean, split)
        ds = loaded[split]
        assert ds["__key__"] == [r["key"] for r in rows]
        for item, row in zip(ds, rows):
            assert item["jpg"].size == (row["width"], row["height"])
            assert [s["text"] for ref in item["json"]["refs"] for s in ref["sentences"]] == row["texts"]


# ---------------------------------------------------------------- resume and refusal


def test_resume_redoes_only_the_damaged_shards_and_matches_a_clean_build(clean, source, tmp_path):
    out = copy_of(clean, tmp_path)
    (out / "train" / "train-000000.tar").unlink()  # shard lost
    (out / "testB" / "parts" / "testB-000001.json").unlink()  # killed between part and tar: tar without part
    val = out / "val" / "val-000000.tar"
    val.write_bytes(val.read_bytes()[:700])  # a tar that is not the one its part describes
    (out / "testA" / ".testA-000000.tar.tmp-host-123").write_bytes(b"half a tar")  # killed mid-write
    (out / ".dataset.json.tmp-host-123").write_text("{")
    (out / "dataset.json").unlink()  # killed before the merge

    summary = build_fixture(source, out)
    assert (summary["shards_written"], summary["failed_shards"]) == (3, [])
    assert summary["shards_kept"] == len(tar_hashes(clean)) - 3
    assert tar_hashes(out) == tar_hashes(clean)
    assert temporaries(out) == []
    assert verify_dataset(out) == []

    again = build_fixture(source, out, workers=0)  # the same command again: nothing to do
    assert (again["shards_written"], again["shards_kept"]) == (0, len(tar_hashes(clean)))


def test_a_different_command_is_refused_unless_overwrite(clean, source, tmp_path):
    out = copy_of(clean, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "train" / "mine.tar").write_text("also mine")
    before = tar_hashes(out)
    with pytest.raises(UserError, match=r"shard_size.*--overwrite"):
        build_fixture(source, out, shard_size=2)
    with pytest.raises(UserError, match="max_size"):
        build_fixture(source, out, max_size=32)
    assert tar_hashes(out) == before  # nothing touched

    summary = build_fixture(source, out, shard_size=2, overwrite=True)
    assert summary["failed_shards"] == [] and summary["shards_kept"] == 0
    assert not (out / "testB" / "testB-000001.tar").exists()  # 2 testB images now share one shard
    assert (out / "notes.txt").read_text() == "mine" and (out / "train" / "mine.tar").read_text() == "also mine"
    assert json.loads((out / "dataset.json").read_text())["build"]["shard_size"] == 2
    assert verify_dataset(out) == []


def test_a_foreign_folder_is_refused(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        build_fixture(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------- failures: samples, shards, workers


def test_a_failing_shard_is_reported_the_others_kept_and_a_rerun_completes_it(clean, source, tmp_path):
    from sgdata.samples import make_sample

    def broken_for_val(kind, spec, options):
        if spec.record["split"] == "val":
            raise RuntimeError("disk on fire")
        return make_sample(kind, spec, options)

    plan = plan_refcoco(source["refer_root"], source["images_dir"], "refcoco", "unc")
    command = json.loads((clean / ".build.json").read_text())["command"]
    out = copy_of(clean, tmp_path)
    (out / "val" / "parts" / "val-000000.json").unlink()  # val must be redone; its old tar must not survive
    summary = build(plan, out, options=SampleOptions(), shard_size=1, command=command, runner=InProcessRunner(),
                    make_sample=broken_for_val)
    assert summary["failed_shards"] == [{"shard": "val/val-000000.tar", "error": "RuntimeError: disk on fire"}]
    assert summary["shards_kept"] == len(tar_hashes(clean)) - 1
    assert not (out / "val" / "val-000000.tar").exists() and temporaries(out) == []
    expected = {k: v for k, v in tar_hashes(clean).items() if not k.startswith("val/")}
    assert tar_hashes(out) == expected
    assert json.loads((out / "dataset.json").read_text())["splits"]["val"]["complete"] is False
    assert any(p.startswith("val/val-000000.tar: missing") for p in verify_dataset(out))

    summary = build_fixture(source, out)  # the same command through the API: only val is redone
    assert (summary["shards_written"], summary["failed_shards"]) == (1, [])
    assert tar_hashes(out) == tar_hashes(clean) and verify_dataset(out) == []


class FlakyMakeSample:
    """A make_sample that fails on purpose: once with an exception, once by killing its worker, always for one."""

    def __init__(self, marks: Path, raise_once: str, crash_once: str, always: str):
        self.marks, self.raise_once, self.crash_once, self.always = str(marks), raise_once, crash_once, always

    def _first_time(self, name: str) -> bool:
        try:
            os.close(os.open(os.path.join(self.marks, name), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def __call__(self, kind, spec, options):
        from sgdata.samples import make_sample

        if spec.key == self.always:
            raise ValueError("this shard never works")
        if spec.key == self.raise_once and self._first_time("raised"):
            raise RuntimeError("transient")
        if spec.key == self.crash_once and self._first_time("crashed"):
            os._exit(1)  # the worker process dies: Ray retries the task
        return make_sample(kind, spec, options)


def test_ray_retries_exceptions_and_crashes_and_reports_what_keeps_failing(clean, source, ray_session, tmp_path):
    plan = plan_refcoco(source["refer_root"], source["images_dir"], "refcoco", "unc")
    keys = {split: [s.key for s in specs] for split, specs in plan.splits.items()}
    marks = tmp_path / "marks"
    marks.mkdir()
    flaky = FlakyMakeSample(marks, raise_once=keys["testB"][0], crash_once=keys["testB"][1], always=keys["val"][0])
    command = json.loads((clean / ".build.json").read_text())["command"]
    out = tmp_path / "out"
    summary = build(plan, out, options=SampleOptions(), shard_size=1, command=command,
                    runner=RayRunner(retries=2), make_sample=flaky)
    assert sorted(p.name for p in marks.iterdir()) == ["crashed", "raised"]  # both faults really happened
    assert [f["shard"] for f in summary["failed_shards"]] == ["val/val-000000.tar"]
    assert "this shard never works" in summary["failed_shards"][0]["error"]
    expected = {k: v for k, v in tar_hashes(clean).items() if not k.startswith("val/")}
    assert tar_hashes(out) == expected and temporaries(out) == []


# ---------------------------------------------------------------- verify


def _truncate(out):
    tar = out / "testB" / "testB-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    return "testB/testB-000001.tar"


def _tamper(out):
    tar = out / "val" / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[900] ^= 0xFF  # inside the first member's data: same size, still a tar
    tar.write_bytes(bytes(data))
    return "val/val-000000.tar"


def _remove(out):
    (out / "testA" / "testA-000000.tar").unlink()
    return "testA/testA-000000.tar"


def _stray(out):
    (out / "train" / ".train-000001.tar.tmp-node-7").write_bytes(b"x")
    return "train/.train-000001.tar.tmp-node-7"


def _swap(out):
    a, b = out / "testB" / "testB-000000.tar", out / "testB" / "testB-000001.tar"
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    return "testB/testB-000000.tar"


@pytest.mark.parametrize("damage", [_truncate, _tamper, _remove, _stray, _swap], ids=lambda f: f.__name__[1:])
def test_verify_names_the_damaged_shard(clean, tmp_path, damage):
    assert verify_dataset(clean) == []
    out = copy_of(clean, tmp_path)
    name = damage(out)
    problems = verify_dataset(out)
    assert problems and all(name in p or "testB-000001" in p for p in problems)
    assert any(p.startswith(name) for p in problems)


# ---------------------------------------------------------------- writer, assignment, runner choice


def _stub(kind, spec, options):
    if spec.record.get("bad"):
        raise SampleError("unreadable_image", "not an image")
    return Finalized(files={"txt": spec.key.encode(), "jpg": b"\xff\xd8" + spec.key.encode(),
                            "json": json.dumps({"width": 3, "height": 2}).encode()},
                     texts=[spec.key, "b"], source_id=spec.image_path)


def _task(out: Path, keys: list[str], bad: tuple[str, ...] = ()) -> ShardTask:
    specs = [SampleSpec(k, f"/img/{k}.jpg", {"bad": k in bad}) for k in keys]
    return ShardTask("train", 3, specs, str(out), "stub", SampleOptions())


def test_write_shard_bytes_are_reproducible_and_plain(tmp_path):
    part_a = write_shard(_task(tmp_path / "a", ["k1", "k0", "k2"], bad=("k2",)), make_sample=_stub)
    part_b = write_shard(_task(tmp_path / "b", ["k1", "k0", "k2"], bad=("k2",)), make_sample=_stub)
    tar_a, tar_b = tmp_path / "a/train/train-000003.tar", tmp_path / "b/train/train-000003.tar"
    assert tar_a.read_bytes() == tar_b.read_bytes()
    assert part_a["sha256"] == part_b["sha256"] == hashlib.sha256(tar_a.read_bytes()).hexdigest()
    assert part_a["bytes"] == tar_a.stat().st_size
    with tarfile.open(tar_a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k1.jpg", "k1.json", "k1.txt", "k0.jpg", "k0.json", "k0.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert part_a["failures"] == [{"path": "/img/k2.jpg", "reason": "unreadable_image", "detail": "not an image",
                                   "split": "train"}]
    assert [r["key"] for r in part_a["rows"]] == ["k1", "k0"] and part_a["rows"][0]["width"] == 3
    on_disk = json.loads((tmp_path / "a/train/parts/train-000003.json").read_text())
    assert on_disk == part_a
    assert temporaries(tmp_path) == []


def test_write_shard_leaves_nothing_behind_when_it_fails(tmp_path):
    def dies_on_k1(kind, spec, options):
        if spec.key == "k1":
            raise OSError("network storage went away")
        return _stub(kind, spec, options)

    with pytest.raises(OSError):
        write_shard(_task(tmp_path, ["k0", "k1"]), make_sample=dies_on_k1)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(AssertionError, match="dot"):
        write_shard(_task(tmp_path, ["a.b"]), make_sample=_stub)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_shard_assignment_depends_on_keys_only(tmp_path):
    specs = [SampleSpec(f"k{i:03d}", f"/{i}.jpg", {}) for i in range(10)]
    forward = shard_tasks(SourcePlan("stub", {"train": specs}), tmp_path, None, 3)["train"]
    backward = shard_tasks(SourcePlan("stub", {"train": specs[::-1]}), tmp_path, None, 3)["train"]
    assert [[s.key for s in t.specs] for t in forward] == [[s.key for s in t.specs] for t in backward]
    assert [len(t.specs) for t in forward] == [3, 3, 3, 1] and [t.index for t in forward] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="duplicate"):
        shard_tasks(SourcePlan("stub", {"train": specs + specs[:1]}), tmp_path, None, 3)


def test_make_runner_choices(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert isinstance(make_runner(0, None), InProcessRunner)
    local = make_runner(None, None)
    assert isinstance(local, RayRunner) and local.num_cpus == os.cpu_count() and local.address is None
    assert make_runner(3, None).num_cpus == 3
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    cluster = make_runner(4, None)
    assert cluster.address == "ray://head:10001" and cluster.max_in_flight == 4
    assert make_runner(None, "auto").address == "auto"
    assert isinstance(make_runner(0, None), InProcessRunner)  # an explicit 0 wins over the environment
    with pytest.raises(UserError, match="in-process"):
        make_runner(0, "auto")
    with pytest.raises(UserError):
        make_runner(-1, None)

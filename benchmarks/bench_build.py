"""Build throughput: `sgdata build` images/s against what Pillow alone can do with the same files.

Input: a few hundred 640x480 photo-like JPEGs (smooth gradients or blotches, stripes, blur, sensor noise,
shapes: `sgdata.synth` at COCO size) in the refer layout, built with `sgdata build refcoco`.

Limits, measured on the same files in the same run, alternating with the builds:
- passthrough: read + decode every file in a tight loop (the build must decode to know a file is a whole,
  usable image); also the plain file-copy rate, the ceiling if nothing were decoded at all;
- --max-size 480: read + decode + LANCZOS resize + JPEG encode at the build's quality.
The limit for `--workers W` runs the loop in max(W, 1) concurrent processes (per core x cores, as the
machine delivers it right now); the single-process rate x cores is recorded beside it.
Ray's start-up (ray.init, then the wait until its worker processes run a task) is timed on its own and
excluded from the build rate: the benchmark starts Ray itself, and the build joins that session.
For the Ray builds the CPU seconds per image of the workers are compared with the Pillow loop's too
(`cpu_efficiency`): on a shared machine the wall-clock ratio moves with other processes' load, the CPU
cost per image does not.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.common import WORK, median, pool_rate, process_cpu_seconds, result

DATASET = "benchref"
WIDTH, HEIGHT = 640, 480
MAX_SIZE = 480
# Several shards per worker, so two workers share the work. sgdata's default is 1000: the per-shard costs
# (four fsyncs, the part record, one task) are spread over 20x more images there.
SHARD_SIZE = 50
WORKER_COUNTS = (0, 1, 2)
PASSTHROUGH_OUT = WORK / "build-passthrough-w0"  # the build the storage, loader and eval benchmarks read


def make_source(count: int, seed: int = 7) -> Path:
    """The refer-layout input (cached between runs: generating costs more than building)."""
    from sgdata.synth import generate_refer_dataset

    root = WORK / f"source-{count}-{seed}"
    marker = root / ".complete"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        generate_refer_dataset(root, images=count, seed=seed, name=DATASET, width=WIDTH, height=HEIGHT, progress=False)
        marker.write_text("ok\n")
    return root


def image_files(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "images").glob("*.jpg"))


# ---- the limit: Pillow alone -------------------------------------------------------------------------


def _read_decoded(path: str) -> Image.Image:
    """Read the whole file, then decode it (the build reads bytes first too)."""
    with open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
    return image


def _decode_files(paths: list[str]) -> tuple[int, float]:
    """(files done, CPU seconds spent) of read + decode."""
    cpu = time.process_time()
    for path in paths:
        _read_decoded(path)
    return len(paths), time.process_time() - cpu


def _resize_files(paths: list[str]) -> tuple[int, float]:
    """(files done, CPU seconds spent) of read + decode + resize + encode, as the build does them."""
    from sgdata.images import JPEG_QUALITY, fit_size

    cpu = time.process_time()
    for path in paths:
        image = _read_decoded(path)
        image = image.convert("RGB").resize(fit_size(*image.size, MAX_SIZE), Image.Resampling.LANCZOS)
        image.save(io.BytesIO(), format="JPEG", quality=JPEG_QUALITY)
    return len(paths), time.process_time() - cpu


LOOPS = {"passthrough": _decode_files, "resize": _resize_files}


class PillowLimit:
    """A pool of warm processes that run the tight loop over an equal share of the files each."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool = mp.get_context("spawn").Pool(processes)
        self.pool.map(_resize_files, [[] for _ in range(processes)])  # imports done in every worker now

    def rate(self, mode: str, paths: list[str]) -> tuple[float, float]:
        """(images/s, CPU seconds per image) of the loop over `paths` shared among the processes."""
        return pool_rate(self.pool, LOOPS[mode], [paths[i::self.processes] for i in range(self.processes)])

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def copy_rate(paths: list[str], dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    for path in paths:
        shutil.copyfile(path, dest / Path(path).name)
    seconds = time.perf_counter() - start
    shutil.rmtree(dest, ignore_errors=True)
    return len(paths) / seconds


# ---- the build ---------------------------------------------------------------------------------------


def build_once(root: Path, out: Path, workers: int, max_size: int | None) -> float:
    """One `sgdata build refcoco` into a fresh OUT; returns the build's own images/s.

    For workers >= 1 a Ray session with that many CPUs must be running (see `RaySession`): the build
    then uses it, so its rate counts shard work only, and Ray's start-up is timed by the session.
    """
    from sgdata import api

    shutil.rmtree(out, ignore_errors=True)
    summary = api.build_refcoco(root, root / "images", DATASET, "unc", out, workers=workers, max_size=max_size,
                                shard_size=SHARD_SIZE)
    if summary["failures"] or summary["failed_shards"]:
        raise RuntimeError(f"the benchmark build of {root} reported failures: {summary['failed_shards'][:2]}")
    if summary["samples_written"] != len(image_files(root)):
        raise RuntimeError(f"the benchmark build wrote {summary['samples_written']} samples, expected {len(image_files(root))}")
    return float(summary["images_per_second"])


def _warm_worker() -> int:
    """What a shard task imports first, so each Ray worker process is up and ready before timing starts."""
    import os

    import sgdata.samples  # noqa: F401
    import sgdata.sources.refcoco  # noqa: F401
    import sgdata.writer  # noqa: F401

    time.sleep(0.2)  # keeps this worker busy, so the next warm-up task lands on another one
    return os.getpid()


class RaySession:
    """A local Ray with `cpus` CPUs whose workers have started: what `sgdata build --workers N` starts itself.

    Its start-up splits into ray.init and the wait for the worker processes (Ray starts them after
    init returns; the first task of a cold session waits for them), both reported apart from the build rate.
    """

    def __init__(self, cpus: int):
        import os

        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        start = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        self.init_s = time.perf_counter() - start
        warm = ray.remote(num_cpus=1)(_warm_worker)
        self.pids = sorted(set(ray.get([warm.remote() for _ in range(cpus)])))
        self.workers_ready_s = time.perf_counter() - start - self.init_s

    def worker_cpu_seconds(self) -> float:
        """CPU seconds (user + system) the session's worker processes have used so far."""
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def close(self) -> float:
        import ray

        start = time.perf_counter()
        ray.shutdown()
        return time.perf_counter() - start


MODES = (("passthrough", None), ("resize", MAX_SIZE))


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """The build_passthrough and build_resize rows; leaves the builds in WORK (PASSTHROUGH_OUT among them).

    Each round runs the in-process builds and one Ray session per worker count (building both modes),
    in reverse order every other round, and the Pillow limits are measured before the first round and
    after every round: a build is compared with the mean of the limits measured just before and just
    after its round, which cancels the machine's slow load drift.
    """
    count, rounds = (200, 1) if quick else (400, 3)
    root = make_source(count)
    paths = image_files(root)
    pools = {n: PillowLimit(n) for n in (1, 2)}
    outputs = {f"{mode}-w{w}": WORK / f"build-{mode}-w{w}" for mode, _ in MODES for w in WORKER_COUNTS}
    limits: list[dict[str, float]] = []  # one per measurement: "<mode>-limit<n>", "<mode>-cpu<n>", "copy"
    builds: list[dict[str, float]] = []  # one per round: "<mode>-w<workers>" and "<mode>-cpu-w<workers>"
    ray_costs: dict[str, list[float]] = {"init_s": [], "workers_ready_s": [], "shutdown_s": []}

    def pillow() -> None:
        rates: dict[str, float] = {}
        for mode, _ in MODES:
            for n, pool in pools.items():
                rates[f"{mode}-limit{n}"], rates[f"{mode}-cpu{n}"] = pool.rate(mode, paths)
        rates["copy"] = copy_rate(paths, WORK / "copy")
        limits.append(rates)

    def in_process(rates: dict[str, float]) -> None:
        for mode, max_size in MODES:
            rates[f"{mode}-w0"] = build_once(root, outputs[f"{mode}-w0"], 0, max_size)

    def on_ray(workers: int, rates: dict[str, float]) -> None:
        session = RaySession(workers)
        try:
            for mode, max_size in MODES:
                cpu = session.worker_cpu_seconds()
                rates[f"{mode}-w{workers}"] = build_once(root, outputs[f"{mode}-w{workers}"], workers, max_size)
                rates[f"{mode}-cpu-w{workers}"] = (session.worker_cpu_seconds() - cpu) / len(paths)
        finally:
            ray_costs["shutdown_s"].append(session.close())
        ray_costs["init_s"].append(session.init_s)
        ray_costs["workers_ready_s"].append(session.workers_ready_s)

    steps = [in_process, lambda rates: on_ray(1, rates), lambda rates: on_ray(2, rates)]
    try:
        pillow()
        for r in range(rounds):
            rates: dict[str, float] = {}
            for step in steps if r % 2 == 0 else reversed(steps):
                step(rates)
            builds.append(rates)
            pillow()
    finally:
        for pool in pools.values():
            pool.close()

    def bracketing(name: str) -> list[float]:
        """The limit `name` around each round: mean of the measurement before and the one after it."""
        return [(limits[r][name] + limits[r + 1][name]) / 2 for r in range(rounds)]

    results = {}
    for mode, _ in MODES:
        by_workers = {}
        for w in WORKER_COUNTS:
            limit = bracketing(f"{mode}-limit{max(w, 1)}")
            rates_w = [b[f"{mode}-w{w}"] for b in builds]
            by_workers[w] = {"images_per_s": round(median(rates_w), 1), "limit": round(median(limit), 1),
                             "per_round_ratios": [round(b / l, 3) for b, l in zip(rates_w, limit)]}
            by_workers[w]["ratio"] = round(by_workers[w]["images_per_s"] / by_workers[w]["limit"], 3)
            if w:  # CPU per image of the Ray workers against the Pillow loop's: insensitive to other load
                build_cpu = median([b[f"{mode}-cpu-w{w}"] for b in builds])
                limit_cpu = median([m[f"{mode}-cpu{max(w, 1)}"] for m in limits])
                by_workers[w]["cpu_ms_per_image"] = round(1000 * build_cpu, 2)
                by_workers[w]["limit_cpu_ms_per_image"] = round(1000 * limit_cpu, 2)
                by_workers[w]["cpu_efficiency"] = round(limit_cpu / build_cpu, 3)
        extra = {
            "images": len(paths),
            "image_size": f"{WIDTH}x{HEIGHT}",
            "shard_size": SHARD_SIZE,
            "rounds": rounds,
            "by_workers": {f"workers={w}": v for w, v in by_workers.items()},
            "limit_single_process_x_2": round(2 * median(bracketing(f"{mode}-limit1")), 1),
            "ray_startup": {k: round(median(v), 2) for k, v in ray_costs.items()},
        }
        if mode == "passthrough":
            extra["file_copy_images_per_s"] = round(median([m["copy"] for m in limits]), 1)
        name = f"build_{mode}"
        results[name] = result(name, by_workers[2]["images_per_s"], by_workers[2]["limit"], "images/s", **extra)
    return results


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=1))

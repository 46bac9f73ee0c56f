"""Peak memory (RSS) of `sgdata build` for several input sizes and shard sizes.

    python -m benchmarks.bench_memory                       # 100 and 400 images, shards of 50 and 400
    python -m benchmarks.bench_memory --images 100 400 --shard-sizes 50 400 --source refcoco --json mem.json

Each build runs as its own child process (`python -m sgdata build ... --workers 0`) and its peak
resident set size is read from the kernel when the child is reaped (`os.wait4` -> ru_maxrss), so the
figure covers the whole build (planning, every shard, the merge) and nothing of this script. A
baseline child that only imports what a build imports gives the fixed cost to subtract.

Why in-process (`--workers 0`): with Ray, each shard is written by a worker running the same
`write_shard`, so one worker's memory is this figure's per-shard part; the driver then only plans and
merges. The claim checked here is that memory depends on neither the dataset size (parts and the
manifest are streamed, tars are written member by member) nor, much, the shard size.

Sources: `captions` (default) writes a folder of photo-like JPEGs with captions; `refcoco` writes the
synthetic referring set (`sgdata synth`) and builds it through the RefCOCO path (masks included).
Inputs are generated once under benchmarks/_work/ (git-ignored) and reused; the build outputs are removed.
Results are recorded in docs/reliability.md ("Resource bounds").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import WORK, child_env, machine

BUILD_IMPORTS = ("import sgdata.cli, sgdata.build, sgdata.samples, sgdata.manifest, sgdata.sources.captions, "
                 "sgdata.sources.refcoco, pyarrow.parquet, pyarrow.csv, rich.table")


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: compresses like a photo (tens of KB per VGA JPEG), unlike pure noise."""
    coarse = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))  # (H, W, 3)


def write_caption_corpus(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """`count` photo-like JPEGs with two captions each (cached: kept when a complete one is already there)."""
    marker = folder / ".complete"
    if marker.is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo_like(rng, width, height).save(folder / f"photo_{index:06d}.jpg", format="JPEG", quality=90)
        (folder / f"photo_{index:06d}.txt").write_text(f"photo number {index}\na second caption for {index}\n")
    marker.write_text("ok\n")


def subset(full: Path, folder: Path, count: int) -> None:
    """The first `count` images of `full` as hard links (a symlink would leave the source root)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = sorted(p.name for p in full.glob("*.jpg"))[:count]
    for name in names:
        for source in (full / name, (full / name).with_suffix(".txt")):
            os.link(source, folder / source.name)


def peak_rss_mb(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit status) of one child process."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty child cannot block on a full pipe
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if code != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} exited {code}:\n{stderr.read().decode(errors='replace')[-2000:]}")
    kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024  # macOS reports bytes
    return kib / 1024, seconds, code


def prepare_sources(work: Path, source: str, counts: list[int], width: int, height: int) -> dict[int, list[str]]:
    """count -> the `sgdata build` arguments (before --out) of a source with that many images."""
    largest = max(counts)
    arguments = {}
    if source == "captions":
        full = work / f"captions-{largest}-{width}x{height}"
        write_caption_corpus(full, largest, width, height)
        for count in counts:
            folder = full if count == largest else work / f"captions-{count}-of-{largest}-{width}x{height}"
            if count != largest:
                subset(full, folder, count)
            arguments[count] = ["build", "captions", str(folder)]
    else:
        from sgdata.synth import generate_refer_dataset

        for count in counts:
            root = work / f"synth-{count}-{width}x{height}"
            if not (root / ".complete").is_file():
                generate_refer_dataset(root, images=count, seed=0, width=width, height=height, progress=False)
                (root / ".complete").write_text("ok\n")
            arguments[count] = ["build", "refcoco", "--refer-root", str(root), "--images", str(root / "images"),
                                "--dataset", "synthref", "--split-by", "unc"]
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 400], help="input sizes (images)")
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[50, 400], help="samples per shard")
    parser.add_argument("--source", choices=["captions", "refcoco"], default="captions")
    parser.add_argument("--size", default=None, help="image WIDTHxHEIGHT (default 640x480 captions, 320x240 refcoco)")
    parser.add_argument("--max-size", type=int, default=None, help="pass --max-size to the builds (resize path)")
    parser.add_argument("--work", type=Path, default=WORK / "memory", help="scratch folder for inputs and outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in (args.size or ("640x480" if args.source == "captions" else "320x240")).split("x"))

    work = args.work
    env = {**child_env(threads=1), "PYTHONWARNINGS": "ignore"}
    sources = prepare_sources(work, args.source, sorted(set(args.images)), width, height)
    baseline, _, _ = peak_rss_mb([sys.executable, "-c", BUILD_IMPORTS], env)
    rows = []
    out = work / "out"
    try:
        for count in sorted(sources):
            for shard_size in args.shard_sizes:
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, "-m", "sgdata", *sources[count], "--out", str(out), "--workers", "0",
                           "--shard-size", str(shard_size)]
                if args.max_size:
                    command += ["--max-size", str(args.max_size)]
                peak, seconds, _ = peak_rss_mb(command, env)
                shards = sorted(out.glob("*/*.tar"))
                rows.append({
                    "images": count, "shard_size": shard_size, "shards": len(shards),
                    "largest_shard_mb": round(max(p.stat().st_size for p in shards) / 1e6, 1),
                    "output_mb": round(sum(p.stat().st_size for p in shards) / 1e6, 1),
                    "peak_rss_mb": round(peak, 1), "above_imports_mb": round(peak - baseline, 1),
                    "seconds": round(seconds, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    host = machine()
    print(f"\nsource {args.source}, images {width}x{height}, max_size {args.max_size}, workers 0; "
          f"baseline (imports only) {baseline:.1f} MB; python {host['python']}, {host['nproc']} CPUs "
          f"({host['cpu_model']}), load {host.get('load_average_at_start')}")
    print("| images | shard size | shards | largest shard MB | output MB | peak RSS MB | above imports MB | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['shard_size']} | {r['shards']} | {r['largest_shard_mb']} | {r['output_mb']} | "
              f"{r['peak_rss_mb']} | {r['above_imports_mb']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({"source": args.source, "image_size": [width, height], "max_size": args.max_size,
                                         "baseline_mb": round(baseline, 1), "machine": host, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

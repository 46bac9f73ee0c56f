"""Loader: images/s that sgmodel's streaming training loader delivers at 384x384 with 2 workers,
against the decode + resize limit of the same images.

- ours: `sgmodel.data.train_data` on the train split of a passthrough build (640x480 JPEGs), 2 worker
  processes, batches of 16 images with their phrases tokenised; timed over whole batches after each
  worker has delivered its first one (worker start-up is not throughput). It runs in a fresh child
  process, so the dataloader forks from a clean interpreter, as in training.
- limit: Pillow decode + bilinear resize to 384x384 of the same `jpg` bytes (held in memory) in a
  tight loop in 2 concurrent processes — the work no loader can avoid, without tar reading,
  tensor conversion, tokenisation, collation or the hand-over between processes.
Rounds alternate, and each loader figure is compared with the mean of the limits measured just
before and after it. The CPU seconds per image of the whole loader (main process and its workers)
against the limit loop's are recorded too (`cpu_efficiency`), a view that other processes' load does
not move. The tokenizer is the paper's (BERT WordPiece, the fast one the demo extra ships) when
installed.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, pool_rate, result, run_child

SIZE = 384
WORKERS = 2
BATCH = 16

_images: list[bytes] = []


def jpg_bytes(shards: list[str]) -> list[bytes]:
    found = []
    for path in shards:
        with tarfile.open(path) as tar:
            found += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return found


def _load(shards: list[str]) -> None:
    global _images
    _images = jpg_bytes(shards)


def _decode_resize(indices: list[int]) -> tuple[int, float]:
    """(images done, CPU seconds spent)"""
    from PIL import Image

    cpu = time.process_time()
    for i in indices:
        image = Image.open(io.BytesIO(_images[i]))
        image.load()
        image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return len(indices), time.process_time() - cpu


class DecodeResizeLimit:
    def __init__(self, shards: list[str], processes: int):
        self.count = len(jpg_bytes(shards))
        self.processes = processes
        self.pool = mp.get_context("spawn").Pool(processes, initializer=_load, initargs=(shards,))
        self.pool.map(_decode_resize, [[] for _ in range(processes)])

    def rate(self, passes: int = 1) -> tuple[float, float]:
        """(images/s, CPU seconds per image)"""
        order = list(range(self.count)) * passes
        return pool_rate(self.pool, _decode_resize, [order[i::self.processes] for i in range(self.processes)])

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def tokenizer_spec() -> str:
    """The paper's tokenizer (BERT WordPiece, fast) from the demo extra when installed, else the built-in byte one."""
    try:
        import all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return ""
    return "package:all-minilm-l6-v2"


def loader_rate(shards: str, batches: int, workers: int = WORKERS, batch: int = BATCH, on_cuda: bool = False) -> dict[str, Any]:
    """In this process: the training loader's images/s over `batches` batches after the warm-up.

    on_cuda: the loader as a GPU run builds it (pinned batches, persistent workers, deeper prefetch).
    """
    import torch

    from benchmarks.common import process_tree_cpu_seconds
    from sgmodel.config import from_dict
    from sgmodel.data import train_data
    from sgmodel.encoders import build_tokenizer

    cfg = from_dict(dict(train_shards=shards, image_size=(SIZE, SIZE), workers=workers, batch_size=batch, shuffle_buffer=100,
                         tokenizer_path=tokenizer_spec()))
    data = train_data(cfg, build_tokenizer(cfg.text), on_cuda=on_cuda)
    batches_iter = iter(data.loader)
    for _ in range(max(1, workers)):  # each worker's first batch includes its start-up
        first = next(batches_iter)
    assert first["images"].shape[-2:] == (SIZE, SIZE), first["images"].shape
    images = texts = 0
    cpu, start = process_tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(batches_iter)
        images += len(batch["keys"])
        texts += len(batch["texts"])
    seconds, cpu = time.perf_counter() - start, process_tree_cpu_seconds() - cpu
    del batches_iter
    return {"images_per_s": images / seconds, "cpu_s_per_image": cpu / images, "texts_per_image": texts / images,
            "tokenizer": cfg.tokenizer_path or "bytes", "torch_threads": torch.get_num_threads()}


def run(out: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """`out`: a passthrough build; its train split feeds both sides."""
    train = out / "train"
    shards = sorted(str(p) for p in train.glob("*.tar"))
    rounds, batches, passes = (1, 12, 1) if quick else (3, 30, 2)
    limit = DecodeResizeLimit(shards, WORKERS)
    limits, children = [limit.rate(passes)], []
    try:
        for _ in range(rounds):
            children.append(run_child("benchmarks.bench_loader", ["--child", str(train), str(batches)], timeout=300))
            limits.append(limit.rate(passes))
    finally:
        limit.close()
    ours = [c["images_per_s"] for c in children]
    bracketing = [(limits[r][0] + limits[r + 1][0]) / 2 for r in range(rounds)]
    value, bound = round(median(ours), 1), round(median(bracketing), 1)
    cpu_ours, cpu_limit = median([c["cpu_s_per_image"] for c in children]), median([cpu for _, cpu in limits])
    row = result(
        "loader", value, bound, "images/s",
        image_size=f"{SIZE}x{SIZE}", workers=WORKERS, batch=BATCH, stored_size="640x480", images_in_split=limit.count,
        timed_batches=batches, rounds=rounds, per_round_ratios=[round(o / b, 3) for o, b in zip(ours, bracketing)],
        phrases_per_image=round(median([c["texts_per_image"] for c in children]), 2), tokenizer=children[0]["tokenizer"],
        cpu_ms_per_image=round(1000 * cpu_ours, 2), limit_cpu_ms_per_image=round(1000 * cpu_limit, 2),
        cpu_efficiency=round(cpu_limit / cpu_ours, 3),
    )
    return {"loader": row}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("SHARDS", "BATCHES"))
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(loader_rate(args.child[0], int(args.child[1]))))
    else:
        print(json.dumps(run(Path(args.out), args.quick), indent=1))

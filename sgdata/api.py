"""The Python API, in the CLI's shape: one function per command, same arguments, same defaults.

    from sgdata import api
    summary = api.build_refcoco("data/refer", "data/coco/train2014", "refcoco", "unc", "shards/refcoco")
    problems = api.verify("shards/refcoco")

Fatal input problems raise `sgdata.format.errors.UserError` (the CLI prints its one sentence, exit 2). So does a
build that yields no sample at all: refused before OUT is touched when the input holds nothing to build,
or raised after the merge when every item was skipped, so that OUT/failures.jsonl lists why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sgdata.format.errors import UserError


def _split_list(splits: str | Sequence[str] | None) -> list[str] | None:
    if splits is None:
        return None
    items = splits.split(",") if isinstance(splits, str) else list(splits)
    items = [s.strip() for s in items if s.strip()]
    return items or None


def _options(max_size: int | None):
    from sgdata.samples import SampleOptions

    if max_size is not None and max_size < 1:
        raise UserError(f"--max-size must be a positive number of pixels, got {max_size}.")
    return SampleOptions(max_size=max_size)


def build_refcoco(
    refer_root: str | Path,
    images: str | Path,
    dataset: str,
    split_by: str,
    out: str | Path,
    splits: str | Sequence[str] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    max_size: int | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Shards of a RefCOCO-family dataset (refer-toolkit layout + COCO images); returns the build summary."""
    from sgdata.build import build
    from sgdata.sources.refcoco import plan_refcoco

    options = _options(max_size)
    wanted = _split_list(splits)
    plan = plan_refcoco(refer_root, images, dataset, split_by, wanted)
    command = {
        "source": "refcoco", "refer_root": str(Path(refer_root).resolve()), "images": str(Path(images).resolve()),
        "dataset": dataset, "split_by": split_by, "splits": wanted,
    }
    return build(plan, out, options=options, shard_size=shard_size, workers=workers, ray_address=ray_address,
                 overwrite=overwrite, command=command, progress=progress)


def build_captions(
    src: str | Path,
    out: str | Path,
    workers: int | None = None,
    ray_address: str | None = None,
    max_size: int | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Shards of an image-caption folder tree or table (jsonl/csv/tsv/parquet); split "train"."""
    from sgdata.build import build
    from sgdata.sources.captions import plan_captions

    options = _options(max_size)
    plan = plan_captions(src)
    command = {"source": "captions", "src": str(Path(src).resolve())}
    return build(plan, out, options=options, shard_size=shard_size, workers=workers, ray_address=ray_address,
                 overwrite=overwrite, command=command, progress=progress)


def inspect(shards: str | Path, render: str | Path | None = None, n: int = 16, examples: int = 3) -> dict[str, Any]:
    """Counts, sizes, texts and a few samples of SHARDS; with `render`, also a PNG grid of `n` samples."""
    from sgdata.inspect import inspect_shards, render_grid

    report = inspect_shards(shards, examples=examples)
    if render is not None:
        report["grid"] = str(render_grid(shards, render, n=n))
    return report


def verify(out: str | Path) -> list[str]:
    """The integrity problems of the dataset at OUT, one line each naming the bad file (empty: all good)."""
    from sgdata.verify import verify_dataset

    return verify_dataset(out)


def synth(out: str | Path, images: int = 1200, seed: int = 0, progress: bool = False) -> Path:
    """Write the synthetic referring dataset (refer layout, images under OUT/images); return its refer root."""
    from sgdata.synth import generate_refer_dataset

    return generate_refer_dataset(Path(out), images=images, seed=seed, progress=progress)

"""The Python API, in the CLI's shape: one function per command, same arguments, same defaults.

    from sgdata import api
    summary = api.build("refcoco", "shards/refcoco", refer_root="data/refer", images="data/coco/train2014",
                        dataset="refcoco", split_by="unc")
    problems = api.verify("shards/refcoco")

`build(command, out, **options)` takes the options of `sgdata build <command>` as keywords (their names
are the flags without dashes, e.g. `hub_parquet` for `--hub-parquet`); `build_refcoco` and
`build_captions` are the same call with the common sources' arguments in order.

Fatal input problems raise `sgdata.format.errors.UserError` (the CLI prints its one sentence, exit 2). So does a
build that yields no sample at all: refused before OUT is touched when the input holds nothing to build,
or raised after the merge when every item was skipped, so that OUT/failures.jsonl lists why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sgdata.format.errors import UserError


def build(
    command: str,
    out: str | Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    max_size: int | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Shards of the source `command` names (see `sgdata build --help`); returns the build summary."""
    from sgdata.build import build as run_build
    from sgdata.samples import SampleOptions
    from sgdata.sources.registry import plan_and_record

    if max_size is not None and max_size < 1:
        raise UserError(f"--max-size must be a positive number of pixels, got {max_size}.")
    plan, record = plan_and_record(command, options)
    return run_build(plan, out, options=SampleOptions(max_size=max_size), shard_size=shard_size, workers=workers,
                     ray_address=ray_address, overwrite=overwrite, command=record, progress=progress)


def build_refcoco(refer_root: str | Path, images: str | Path, dataset: str, split_by: str, out: str | Path,
                  splits: str | Sequence[str] | None = None, **build_options: Any) -> dict[str, Any]:
    """Shards of a RefCOCO-family dataset in the refer toolkit layout + COCO images (`build("refcoco", ...)`)."""
    return build("refcoco", out, refer_root=refer_root, images=images, dataset=dataset, split_by=split_by,
                 splits=splits, **build_options)


def build_captions(src: str | Path, out: str | Path, **build_options: Any) -> dict[str, Any]:
    """Shards of an image-caption folder tree or table (jsonl/csv/tsv/parquet); split "train"."""
    return build("captions", out, src=src, **build_options)


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

"""Merge the per-shard part records into the dataset's index files (driver side, after the run).

Per split (OUT/<split>/): `manifest.parquet` (one row per sample), `stats.json`, `sizes.json`
(`{"<split>-000000.tar": n}`) and `index.wids.json` (the wids shard index). At the root:
`dataset.json` (the card) and `failures.jsonl` (planning failures + sample failures, sorted).

Everything is derived from the parts, so the merge can be rerun at any time (resume does).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterator

from sgdata.format.files import JSON_TEXT_ERRORS
from sgdata.sources.base import Failure, SourcePlan
from sgdata.store import Store
from sgdata.writer import part_file, shard_is_complete

MANIFEST_COLUMNS = ("key", "shard", "source_id", "width", "height", "num_texts", "texts")
SPLIT_FILES = ("manifest.parquet", "stats.json", "sizes.json", "index.wids.json")
ROOT_FILES = ("dataset.json", "failures.jsonl", ".build.json")
FORMAT = "sgdata-webdataset-v1"


def manifest_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("source_id", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("num_texts", pa.int32()),
        ("texts", pa.list_(pa.string())),
    ])


def iter_complete_parts(store: Store, split: str, num_shards: int) -> Iterator[dict[str, Any]]:
    """The part records of the split's complete shards, in shard order, one at a time."""
    for index in range(num_shards):
        if shard_is_complete(store, split, index):
            yield json.loads(store.read_text(part_file(split, index)))


def write_split_outputs(store: Store, split: str, num_shards: int, planning_failures: list[Failure],
                        run: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Write the split's manifest, stats, sizes and wids index; return its stats and sample failures.

    Parts are streamed into the parquet file one at a time, so memory stays bounded by the shard size.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store.make_folder(split)
    sizes: dict[str, int] = {}
    reasons = Counter(f.reason for f in planning_failures)
    failures: list[dict[str, str]] = []
    totals: Counter = Counter()
    extensions: set[str] = set()
    schema = manifest_schema()
    with store.writing(f"{split}/manifest.parquet") as f, pq.ParquetWriter(f, schema) as writer:
        for part in iter_complete_parts(store, split, num_shards):
            columns = {name: [row[name] for row in part["rows"]] for name in MANIFEST_COLUMNS}
            writer.write_table(pa.table(columns, schema=schema))
            sizes[part["shard"]] = part["samples"]
            failures += part["failures"]
            reasons.update(f["reason"] for f in part["failures"])
            extensions.update(part["extensions"])
            totals.update(samples=part["samples"], texts=part["texts"], bytes=part["bytes"])
            totals["seconds"] += part["seconds"]

    store.write_json(f"{split}/sizes.json", sizes)
    store.write_json(f"{split}/index.wids.json", {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": split,
        # urls are relative to this index file, which wids resolves against the index's location
        "shardlist": [{"url": shard, "nsamples": n} for shard, n in sizes.items()],
    })
    worker_seconds = totals["seconds"]
    stats = {
        "split": split,
        "shards": len(sizes),
        "shards_expected": num_shards,
        "complete": len(sizes) == num_shards,
        "samples": totals["samples"],
        "texts": totals["texts"],
        "bytes": totals["bytes"],
        "failures": sum(reasons.values()),
        "failures_by_reason": dict(sorted(reasons.items())),
        # seconds spent by workers on this split's shards (summed over shards, including earlier
        # runs of a resumed build) and the per-worker throughput they give
        "seconds": round(worker_seconds, 3),
        "images_per_second": round(totals["samples"] / worker_seconds, 2) if worker_seconds > 0 else None,
        "extensions": sorted(extensions),
        "run": run,  # wall clock of the last command over all splits
    }
    store.write_json(f"{split}/stats.json", stats)
    return stats, failures


def failure_sort_key(failure: dict[str, str]) -> tuple[str, ...]:
    return (failure.get("split", ""), failure["path"], failure["reason"], failure.get("detail", ""))


def merge(store: Store, plan: SourcePlan, num_shards: dict[str, int], build_record: dict[str, Any],
          run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write every index file from the parts on disk; return the per-split stats."""
    from sgdata import __version__

    stats = {}
    failures = [f.to_json() for f in plan.failures]
    for split in sorted(num_shards):
        split_failures = [f for f in plan.failures if f.split == split]
        stats[split], sample_failures = write_split_outputs(store, split, num_shards[split], split_failures, run)
        failures += sample_failures
    failures.sort(key=failure_sort_key)
    with store.writing("failures.jsonl") as f:
        for failure in failures:
            f.write((json.dumps(failure, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8", JSON_TEXT_ERRORS))

    store.write_json("dataset.json", {
        "format": FORMAT,
        "sgdata_version": __version__,
        "kind": plan.kind,
        "source": plan.card,
        "options": build_record.get("options"),
        "build": build_record,
        "splits": {
            split: {key: s[key] for key in ("samples", "texts", "bytes", "failures", "complete", "extensions")}
            | {"shards": s["shards_expected"]}
            for split, s in stats.items()
        },
        "failures": len(failures),
        # every failure under its split, as failures.jsonl files it: a built split's count is its
        # stats.json count; the rest belong to a split with no sample or to none ("": an
        # instances.json record, a ref whose split cannot be read)
        "failures_by_split": dict(sorted(Counter(f.get("split", "") for f in failures).items())),
    })
    return stats

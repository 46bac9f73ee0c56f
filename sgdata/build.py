"""The build: plan → shard tasks → runner → merge, with resume and refusal of a different command.

Shard assignment is independent of the worker count: each split's specs are sorted by key and cut
into consecutive chunks of `shard_size`, so shard i always holds the same samples.

OUT's state machine:
- `OUT/.build.json` (written first) records what decides the bytes: source kind, the command's
  content arguments, the sample options, the shard size. Same record → resume: complete shards
  (see `sgdata.writer`) are kept, the rest redone. Different record → refused unless `overwrite`,
  which deletes only files sgdata writes (shards, parts, index files, temporaries) and starts over.
- Temporaries left by killed runs are removed before the run starts.

OUT is a local folder or a prefix on object storage (`sgdata.store.Store`); every step below goes
through the store, so both hold the same files and the same guarantees.

A build that yields no sample in any split (and lost no shard) raises UserError after the merge: a
dataset with nothing to train on is an error, and failures.jsonl is written first so it says why.
One empty split beside others is not an error (the source notes it in the card).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from sgdata.format.errors import UserError
from sgdata.format.files import is_temporary
from sgdata.manifest import ROOT_FILES, SPLIT_FILES, merge
from sgdata.runner import Runner, ShardProgress, make_runner
from sgdata.sources.base import SampleSpec, SourcePlan
from sgdata.store import Store
from sgdata.writer import (
    SHARD_RE, ShardTask, part_file, shard_file, shard_is_complete, specs_digest, write_shard,
)

BUILD_RECORD = ".build.json"
PART_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.json$")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    """JSON-normal form (dataclasses as dicts, tuples as lists) so records compare equal after a reload."""
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))


def build_record(plan: SourcePlan, options: Any, shard_size: int, command: dict[str, Any]) -> dict[str, Any]:
    """What decides the output bytes (never the worker count or the Ray address)."""
    return _jsonable({"kind": plan.kind, "command": command, "options": options, "shard_size": shard_size})


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new), key=str):
            diffs += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return diffs
    return [] if old == new else [f"{prefix.rstrip('.')} was {old!r}, now {new!r}"]


def _sgdata_files(store: Store):
    """Every file in OUT that sgdata writes (and nothing else): what --overwrite may delete."""
    files, folders = store.entries()
    for name in ROOT_FILES:
        if name in files:
            yield name
    for name in files:
        if is_temporary(name):
            yield name
    for split in folders:
        split_files, _ = store.entries(split)
        for name in split_files:
            m = SHARD_RE.match(name)
            if (m and m["split"] == split) or name in SPLIT_FILES or is_temporary(name):
                yield f"{split}/{name}"
        part_files, _ = store.entries(f"{split}/parts")
        for name in part_files:
            m = PART_RE.match(name)
            if (m and m["split"] == split) or is_temporary(name):
                yield f"{split}/parts/{name}"


def clear_outputs(store: Store) -> int:
    """Delete sgdata's files in OUT (and the folders that become empty); keep anything else."""
    files = list(_sgdata_files(store))
    for name in files:
        store.delete(name)
    for split in store.entries()[1]:
        store.remove_empty_folder(f"{split}/parts")
        store.remove_empty_folder(split)
    return len(files)


def remove_temporaries(store: Store) -> int:
    """Remove temporaries of killed runs (a live writer of this same OUT is not supported)."""
    stale = [name for name in _sgdata_files(store) if is_temporary(name.rpartition("/")[2])]
    for name in stale:
        store.delete(name)
    return len(stale)


def prepare_out(store: Store, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse a different command on an existing OUT (unless overwrite), then record this one."""
    found = store.is_folder()
    if found is False:
        raise UserError(f"--out {store.url()} exists and is not a folder.")
    store.make_folder()
    if overwrite:
        clear_outputs(store)
    elif store.is_file(BUILD_RECORD):
        try:
            previous = json.loads(store.read_text(BUILD_RECORD))
        except ValueError:
            previous = None
        if previous != record:
            diffs = _differences(previous, record) if isinstance(previous, dict) else ["unreadable record"]
            raise UserError(
                f"{store.url()} holds a build made by a different command ({'; '.join(diffs[:3])}): rerun the "
                f"same command to resume it, or pass --overwrite to replace it."
            )
    elif found and any(store.entries()):
        raise UserError(f"{store.url()} is not empty and holds no sgdata build: choose an empty --out or pass --overwrite.")
    store.write_json(BUILD_RECORD, record)
    remove_temporaries(store)


def shard_tasks(plan: SourcePlan, out: str | Path, options: Any, shard_size: int) -> dict[str, list[ShardTask]]:
    """Cut each split's key-sorted specs into consecutive chunks: shard i is fixed by the plan alone."""
    tasks: dict[str, list[ShardTask]] = {}
    for split in sorted(plan.splits):
        specs: list[SampleSpec] = sorted(plan.splits[split], key=lambda s: s.key)
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"split {split} of the {plan.kind} plan has duplicate sample keys")
        dotted = [k for k in keys if "." in k]
        if dotted:
            raise ValueError(f"sample keys must not contain dots: {dotted[:3]}")
        tasks[split] = [
            ShardTask(split, i // shard_size, specs[i:i + shard_size], Store(out).root, plan.kind, options,
                      digest=specs_digest(specs[i:i + shard_size]))
            for i in range(0, len(specs), shard_size)
        ]
    return tasks


def _remove_surplus_shards(store: Store, split: str, num_shards: int) -> None:
    """Shards numbered past the plan's count (the source shrank since a killed run) are not ours to keep."""
    for folder, pattern in ((split, SHARD_RE), (f"{split}/parts", PART_RE)):
        for name in store.entries(folder)[0]:
            m = pattern.match(name)
            if m and m["split"] == split and int(m["index"]) >= num_shards:
                store.delete(f"{folder}/{name}")


def build(
    plan: SourcePlan,
    out: str | Path,
    *,
    options: Any,
    shard_size: int = 1000,
    workers: int | None = None,
    ray_address: str | None = None,
    overwrite: bool = False,
    command: dict[str, Any],
    progress: bool = False,
    runner: Runner | None = None,
    make_sample: Callable | None = None,
) -> dict[str, Any]:
    """Build (or resume) the dataset of `plan` in `out`; return the summary.

    `command` holds the caller's content arguments (paths, dataset, splits...), recorded to detect a
    different command on the same OUT. `runner`/`make_sample` are for tests (dependency injection).
    """
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}.")
    if not any(plan.splits.values()) and not plan.failures:  # the sources say why themselves; this is the net
        raise UserError(f"no sample could be built: the {plan.kind} source holds no item.")
    store = Store(out)
    record = build_record(plan, options, shard_size, command)
    tasks_by_split = shard_tasks(plan, store.root, options, shard_size)
    runner = runner or make_runner(workers, ray_address)
    with store.reaching():
        prepare_out(store, record, overwrite)
        todo, kept = _shards_to_write(store, tasks_by_split)

    # Longest first: the last tasks to start are the short ones, so no worker is left with a long tail
    # while the others idle (the order shards are written in does not change their bytes).
    todo.sort(key=lambda task: len(task.specs), reverse=True)
    fn = write_shard if make_sample is None else functools.partial(write_shard, make_sample=make_sample)
    written = {"shards": 0, "samples": 0}
    start = time.perf_counter()
    with ShardProgress(len(todo), enabled=progress) as bar:
        def on_done(task: ShardTask, part: dict[str, Any]) -> None:
            written["shards"] += 1
            written["samples"] += part["samples"]
            bar.advance(part["samples"])

        failed = runner.run(todo, fn, on_done)
    for split in tasks_by_split:  # the shards' renames, made durable once (see sgdata.writer)
        store.sync(f"{split}/parts")
        store.sync(split)
    seconds = time.perf_counter() - start
    with store.reaching():
        remove_temporaries(store)  # left by workers that crashed (their tasks were retried); none is running now

    startup = float(getattr(runner, "startup_seconds", 0.0))
    work_seconds = seconds - startup
    run = {
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup, 3),  # starting or joining Ray, not counted in images_per_second
        "shards_written": written["shards"],
        "shards_kept": kept,
        "samples_written": written["samples"],
        "images_per_second": round(written["samples"] / work_seconds, 2)
        if work_seconds > 0 and written["samples"] else None,
        "runner": type(runner).__name__,
    }
    num_shards = {split: len(tasks) for split, tasks in tasks_by_split.items()}
    with store.reaching():
        stats = merge(store, plan, num_shards, record, run)
    if not failed and not any(s["samples"] for s in stats.values()):
        raise UserError(_nothing_built(store, plan, stats))
    return {
        "out": store.url(),
        "kind": plan.kind,
        "splits": {split: {k: s[k] for k in ("samples", "texts", "shards", "shards_expected", "bytes",
                                               "failures", "failures_by_reason")}
                   for split, s in stats.items()},
        "failures": sum(s["failures"] for s in stats.values()) + sum(1 for f in plan.failures if f.split not in stats),
        "failed_shards": [
            {"shard": shard_file(f.task.split, f.task.index), "error": f.error}
            for f in failed
        ],
        **run,
    }


def _shards_to_write(store: Store, tasks_by_split: dict[str, list[ShardTask]]) -> tuple[list[ShardTask], int]:
    """(the tasks whose shard is not complete, how many shards are kept from an earlier run)."""
    todo, kept = [], 0
    for split, tasks in tasks_by_split.items():
        store.make_folder(f"{split}/parts")
        _remove_surplus_shards(store, split, len(tasks))
        for task in tasks:
            if shard_is_complete(store, split, task.index, task.digest):
                kept += 1
            else:  # an old tar or part must not stand in for this shard if redoing it fails
                store.delete(shard_file(split, task.index))
                store.delete(part_file(split, task.index))
                todo.append(task)
    return todo, kept


def _nothing_built(store: Store, plan: SourcePlan, stats: dict[str, dict[str, Any]]) -> str:
    """The sentence for a build whose every item was skipped (written after the merge, so the list is there)."""
    reasons = Counter(f.reason for f in plan.failures if f.split not in stats)
    for split_stats in stats.values():
        reasons.update(split_stats["failures_by_reason"])
    top = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(3))
    more = ", ..." if len(reasons) > 3 else ""
    return (f"no sample could be built: every item was skipped ({sum(reasons.values())} failures: {top}{more}); "
            f"see {store.url('failures.jsonl')}.")


def summary_table(summary: dict[str, Any]):
    """The one-screen end-of-build summary as a rich Table (the CLI prints it)."""
    from rich.table import Table

    table = Table(title=f"sgdata build → {summary['out']}", title_justify="left")
    for column in ("split", "samples", "texts", "shards", "MB", "failures"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, s in summary["splits"].items():
        shards = f"{s['shards']}/{s['shards_expected']}"
        table.add_row(split, str(s["samples"]), str(s["texts"]), shards, f"{s['bytes'] / 1e6:.1f}", str(s["failures"]))
    rate = summary["images_per_second"]
    table.caption = (
        f"{summary['shards_written']} shards written, {summary['shards_kept']} kept from an earlier run, "
        f"{summary['seconds']:.1f} s ({summary['startup_seconds']:.1f} s starting Ray)"
        + (f", {rate:.1f} images/s" if rate else "")
        + f"; failures: {summary['failures']} (see failures.jsonl)"
    )
    table.caption_justify = "left"
    return table


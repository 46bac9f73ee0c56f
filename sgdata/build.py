"""The build: plan → shard tasks → runner → merge, with resume and refusal of a different command.

Shard assignment is independent of the worker count: each split's specs are sorted by key and cut
into consecutive chunks of `shard_size`, so shard i always holds the same samples.

OUT's state machine:
- `OUT/.build.json` (written first) records what decides the bytes: source kind, the command's
  content arguments, the sample options, the shard size. Same record → resume: complete shards
  (see `sgdata.writer`) are kept, the rest redone. Different record → refused unless `overwrite`,
  which deletes only files sgdata writes (shards, parts, index files, temporaries) and starts over.
- Temporaries left by killed runs are removed before the run starts.

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
from sgdata.format.files import fsync_dir, is_temporary, write_json_atomic
from sgdata.manifest import ROOT_FILES, SPLIT_FILES, merge
from sgdata.runner import Runner, ShardProgress, make_runner
from sgdata.sources.base import SampleSpec, SourcePlan
from sgdata.writer import (
    SHARD_RE, ShardTask, part_path, shard_is_complete, shard_path, specs_digest, write_shard,
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


def _sgdata_files(out: Path):
    """Every file in OUT that sgdata writes (and nothing else): what --overwrite may delete."""
    for name in ROOT_FILES:
        if (out / name).is_file():
            yield out / name
    for entry in sorted(out.iterdir()):
        if entry.is_file() and is_temporary(entry.name):
            yield entry
        if not entry.is_dir() or entry.is_symlink():
            continue
        split = entry.name
        for f in sorted(entry.iterdir()):
            m = SHARD_RE.match(f.name)
            if f.is_file() and ((m and m["split"] == split) or f.name in SPLIT_FILES or is_temporary(f.name)):
                yield f
        parts = entry / "parts"
        if parts.is_dir() and not parts.is_symlink():
            for f in sorted(parts.iterdir()):
                m = PART_RE.match(f.name)
                if f.is_file() and ((m and m["split"] == split) or is_temporary(f.name)):
                    yield f


def clear_outputs(out: Path) -> int:
    """Delete sgdata's files in OUT (and the folders that become empty); keep anything else."""
    files = list(_sgdata_files(out))
    for f in files:
        f.unlink()
    for entry in sorted(out.iterdir()):
        for folder in (entry / "parts", entry):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
    return len(files)


def remove_temporaries(out: Path) -> int:
    """Remove temporaries of killed runs (a live writer of this same OUT is not supported)."""
    stale = [f for f in _sgdata_files(out) if is_temporary(f.name)]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def prepare_out(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse a different command on an existing OUT (unless overwrite), then record this one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / BUILD_RECORD
    if overwrite:
        clear_outputs(out)
    elif record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
        except ValueError:
            previous = None
        if previous != record:
            diffs = _differences(previous, record) if isinstance(previous, dict) else ["unreadable record"]
            raise UserError(
                f"{out} holds a build made by a different command ({'; '.join(diffs[:3])}): rerun the "
                f"same command to resume it, or pass --overwrite to replace it."
            )
    elif any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no sgdata build: choose an empty --out or pass --overwrite.")
    write_json_atomic(record_path, record)
    remove_temporaries(out)


def shard_tasks(plan: SourcePlan, out: Path, options: Any, shard_size: int) -> dict[str, list[ShardTask]]:
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
            ShardTask(split, i // shard_size, specs[i:i + shard_size], str(out), plan.kind, options,
                      digest=specs_digest(specs[i:i + shard_size]))
            for i in range(0, len(specs), shard_size)
        ]
    return tasks


def _remove_surplus_shards(out: Path, split: str, num_shards: int) -> None:
    """Shards numbered past the plan's count (the source shrank since a killed run) are not ours to keep."""
    split_dir = out / split
    if not split_dir.is_dir():
        return
    for f in list(split_dir.iterdir()) + list((split_dir / "parts").glob("*.json")):
        m = SHARD_RE.match(f.name) or PART_RE.match(f.name)
        if m and m["split"] == split and int(m["index"]) >= num_shards:
            f.unlink()


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
    out = Path(out)
    record = build_record(plan, options, shard_size, command)
    tasks_by_split = shard_tasks(plan, out, options, shard_size)
    runner = runner or make_runner(workers, ray_address)
    prepare_out(out, record, overwrite)

    todo, kept = [], 0
    for split, tasks in tasks_by_split.items():
        (out / split / "parts").mkdir(parents=True, exist_ok=True)
        _remove_surplus_shards(out, split, len(tasks))
        for task in tasks:
            if shard_is_complete(out, split, task.index, task.digest):
                kept += 1
            else:  # an old tar or part must not stand in for this shard if redoing it fails
                shard_path(out, split, task.index).unlink(missing_ok=True)
                part_path(out, split, task.index).unlink(missing_ok=True)
                todo.append(task)

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
        fsync_dir(out / split / "parts")
        fsync_dir(out / split)
    seconds = time.perf_counter() - start
    remove_temporaries(out)  # left by workers that crashed (their tasks were retried); none is running now

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
    stats = merge(out, plan, num_shards, record, run)
    if not failed and not any(s["samples"] for s in stats.values()):
        raise UserError(_nothing_built(out, plan, stats))
    return {
        "out": str(out),
        "kind": plan.kind,
        "splits": {split: {k: s[k] for k in ("samples", "texts", "shards", "shards_expected", "bytes",
                                               "failures", "failures_by_reason")}
                   for split, s in stats.items()},
        "failures": sum(s["failures"] for s in stats.values()) + sum(1 for f in plan.failures if f.split not in stats),
        "failed_shards": [
            {"shard": str(shard_path(out, f.task.split, f.task.index).relative_to(out)), "error": f.error}
            for f in failed
        ],
        **run,
    }


def _nothing_built(out: Path, plan: SourcePlan, stats: dict[str, dict[str, Any]]) -> str:
    """The sentence for a build whose every item was skipped (written after the merge, so the list is there)."""
    reasons = Counter(f.reason for f in plan.failures if f.split not in stats)
    for split_stats in stats.values():
        reasons.update(split_stats["failures_by_reason"])
    top = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(3))
    more = ", ..." if len(reasons) > 3 else ""
    return (f"no sample could be built: every item was skipped ({sum(reasons.values())} failures: {top}{more}); "
            f"see {out / 'failures.jsonl'}.")


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


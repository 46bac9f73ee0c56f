"""Run every benchmark, print one table, write benchmarks/results.json (and, for a full run, the table
in docs/benchmarks.md).

    python benchmarks/run_all.py            # the full run (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # fewer images, rounds and steps (under 5 minutes on 2 cores)
    python benchmarks/run_all.py --only build,storage

results.json maps each benchmark name to {"value", "limit_or_baseline", "ratio", "unit", ...details};
ratio > 1 always means better than the limit or baseline (storage: baseline bytes / our bytes).
Each ratio is measured side by side in this run (alternating rounds, medians), because absolute figures
move with the machine's load. Generated inputs and outputs go to benchmarks/_work/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import REQUIRED, RESULTS, ROOT, WORK, machine, table  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
GOALS = {"build_passthrough": 0.8, "build_resize": 0.8, "storage": 20.0, "loader": 0.8,
         "train_step_paper": 1.5, "train_step_tiny": 1.5, "eval": 10.0}
GROUPS = ("build", "storage", "loader", "eval", "train")


def run_benchmarks(quick: bool, only: set[str]) -> tuple[dict, dict[str, str], dict[str, float]]:
    """(rows by name, errors by group, seconds by group). A failing group is reported, the others still run."""
    from benchmarks import bench_build

    rows: dict = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    passthrough = bench_build.PASSTHROUGH_OUT

    def attempt(group: str, fn) -> None:
        if group not in only:
            return
        start = time.perf_counter()
        print(f"[{group}] running ...", file=sys.stderr, flush=True)
        try:
            rows.update(fn())
        except Exception as exc:  # one broken stage must not hide the others' figures
            errors[group] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds[group] = round(time.perf_counter() - start, 1)
        print(f"[{group}] {seconds[group]} s", file=sys.stderr, flush=True)

    def build():
        return bench_build.run(quick)

    def needs_build() -> Path:
        if not (passthrough / "dataset.json").is_file():
            bench_build.build_once(bench_build.make_source(200 if quick else 400), passthrough, 0, None)
        return passthrough

    def storage():
        from benchmarks import bench_storage
        return bench_storage.run(needs_build())

    def loader():
        from benchmarks import bench_loader
        return bench_loader.run(needs_build(), quick)

    def evaluation():
        from benchmarks import bench_eval
        return bench_eval.run(needs_build(), quick)

    def train():
        from benchmarks import bench_train_step
        return bench_train_step.run(quick)

    for group, fn in zip(GROUPS, (build, storage, loader, evaluation, train)):
        attempt(group, fn)
    return rows, errors, seconds


def update_docs(markdown: str) -> None:
    """Replace the generated block of docs/benchmarks.md (the prose around it is written by hand)."""
    text = DOCS.read_text() if DOCS.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{START}\n{markdown}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, rounds and steps (< 5 minutes on 2 cores)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the results (default: %(default)s)")
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="write the table into docs/benchmarks.md (default: full runs only)")
    args = parser.parse_args(argv)
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = only - set(GROUPS)
    if unknown:
        parser.error(f"unknown benchmark group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    WORK.mkdir(parents=True, exist_ok=True)

    info = machine()
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    rows, errors, seconds = run_benchmarks(args.quick, only)
    total = round(time.perf_counter() - started, 1)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    for row in rows.values():
        row["mode"] = mode
        row["measured"] = when

    ordered = {name: rows[name] for name in REQUIRED if name in rows}
    results_path = args.results.resolve()
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    merged = {name: ordered.get(name, previous.get(name)) for name in REQUIRED if name in ordered or name in previous}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    others = {name: row for name, row in previous.items() if name not in REQUIRED}  # e.g. gpu_step rows from a GPU machine
    results_path.write_text(json.dumps({**merged, **others}, indent=1) + "\n")

    machine_line = (f"{info['nproc']} cores ({info['cpu_model']}), {info.get('memory_gb', '?')} GB, torch {info['torch']}, "
                    f"Pillow {info['pillow']}, Python {info['python']}, GPU: {info['gpu'] or 'none'}; "
                    f"load average at start {info.get('load_average_at_start')}")
    reused = sorted(set(merged) - set(ordered))
    markdown = (f"Run {when}, `{'--quick' if args.quick else 'full'}` mode, {total} s in all "
                f"({', '.join(f'{k} {v} s' for k, v in seconds.items())}).\n"
                + (f"Rows {', '.join(reused)} are kept from the earlier run of "
                   f"{', '.join(sorted({str(merged[n].get('measured')) for n in reused}))}.\n" if reused else "")
                + f"Machine: {machine_line}.\n\n{table(merged, GOALS)}")
    print(markdown)
    if errors:
        print("\nfailed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), file=sys.stderr)
    write_docs = args.docs if args.docs is not None else not args.quick
    wrote_docs = write_docs and not errors and set(merged) == set(REQUIRED)  # only a complete table goes there
    if wrote_docs:
        update_docs(markdown)
    print(f"\nwrote {results_path}" + (f" and {DOCS.relative_to(ROOT)}" if wrote_docs else ""), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

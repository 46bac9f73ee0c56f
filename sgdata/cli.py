"""`sgdata` command line: a thin typer layer over `sgdata.api`.

Exit status: 0 success; 1 the work ran but something is wrong (shards that failed after retries,
verify problems); 2 a fatal user error, printed as one sentence without a traceback (a build that yields
no sample at all is one: its failures.jsonl, when it got that far, says why each item was skipped).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sgdata import api
from sgdata.format.errors import UserError
from sgdata.sources.base import Option

app = typer.Typer(
    name="sgdata", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    help="Build, inspect and verify sharded WebDataset datasets for referring segmentation.",
)
build_app = typer.Typer(no_args_is_help=True, help="Build shards from one of the sources below (one command each).")
app.add_typer(build_app, name="build")

Out = Annotated[str, typer.Option("--out", help=(
    "Output folder, or object storage such as s3://bucket/prefix (on a cluster: storage every node reaches)."))]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", help="Local Ray CPUs (default: all cores); 0 runs in this process without Ray.")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", help="Join this Ray cluster (e.g. auto, ray://head:10001); default: RAY_ADDRESS or a local Ray.")]
MaxSize = Annotated[Optional[int], typer.Option(
    "--max-size", help="Resize so the longer image side is at most this many pixels (default: keep the size).")]
ShardSize = Annotated[int, typer.Option("--shard-size", help="Samples (images) per shard.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing build in OUT made by a different command.")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"sgdata: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn UserError into its one sentence on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e), 2)

    return wrapper


def _report_build(summary: dict) -> None:
    from rich.console import Console

    from sgdata.build import summary_table

    Console().print(summary_table(summary))
    if summary["failed_shards"]:
        for failed in summary["failed_shards"]:
            typer.echo(f"sgdata: shard {failed['shard']} failed after retries: {failed['error']}", err=True)
        _fail(f"{len(summary['failed_shards'])} shard(s) failed; rerun the same command to retry them.", 1)


def _typer_parameter(option: Option) -> inspect.Parameter:
    """One declared source option as the typer parameter of its build command."""
    kind = {"path": Path, "text": str, "int": int, "splits": str}[option.type]
    if option.argument:
        info = typer.Argument(metavar=option.flag, help=option.help)
    else:
        info = typer.Option(option.flag, help=option.help)
    annotation = Annotated[kind if option.required else Optional[kind], info]
    default = inspect.Parameter.empty if option.required else None
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


# The options every build command takes besides its source's own (in the order --help shows them).
BUILD_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
    for name, annotation, default in (
        ("out", Out, inspect.Parameter.empty), ("workers", Workers, None), ("ray_address", RayAddress, None),
        ("max_size", MaxSize, None), ("shard_size", ShardSize, 1000), ("overwrite", Overwrite, False),
    )
]


def _add_build_command(command: str) -> None:
    """`sgdata build COMMAND`: the flags of its sources' declared options, then the common build options."""
    from sgdata.sources import registry

    def run(**values) -> None:
        summary = api.build(command, progress=True, **values)
        _report_build(summary)

    parameters = [_typer_parameter(o) for o in registry.command_options(command)] + BUILD_PARAMETERS
    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    run.__name__ = run.__qualname__ = f"build_{command}"
    run.__doc__ = registry.commands()[command][0].help
    build_app.command(command)(user_errors(run))


def _add_build_commands() -> None:
    from sgdata.sources import registry

    for command in registry.commands():
        _add_build_command(command)


_add_build_commands()


@app.command("inspect")
@user_errors
def inspect_command(
    shards: Annotated[str, typer.Argument(
        metavar="SHARDS", help="A dataset or split folder, a .tar, a glob or a brace pattern.")],
    render: Annotated[Optional[Path], typer.Option(
        "--render", help="Draw a PNG grid (images, masks, phrases) here.")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples in the grid.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Counts, sizes, texts and a few samples of shards; --render draws them."""
    report = api.inspect(shards, render=render, n=n)
    if as_json:
        typer.echo(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        _print_inspect(report)
    if report["problems"]:
        _fail(f"{len(report['problems'])} shard(s) could not be read: {report['problems'][0]}", 1)


def _print_inspect(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=f"{report['num_shards']} shard(s)", title_justify="left")
    rows = [("samples", report["samples"]), ("texts", report["texts"]), ("MB", f"{report['bytes'] / 1e6:.2f}"),
            ("extensions", report["extensions"]), ("width", report["width"]), ("height", report["height"]),
            ("texts per sample", report["texts_per_sample"])]
    for name, value in rows:
        table.add_row(name, str(value))
    for example in report["examples"]:
        table.add_row(f"{example['shard']}:{example['key']}",
                      f"{example['width']}x{example['height']} " + " | ".join(example["texts"][:4]))
    if "grid" in report:
        table.add_row("grid", report["grid"])
    Console().print(table)


@app.command("verify")
@user_errors
def verify_command(out: Annotated[str, typer.Argument(metavar="OUT", help="The --out folder or URL of a build.")]) -> None:
    """Integrity check: exit 0 only if every shard is whole and matches its manifest."""
    problems = api.verify(out)
    for problem in problems:
        typer.echo(problem)
    if problems:
        _fail(f"{len(problems)} problem(s) in {out}.", 1)
    typer.echo(f"{out}: OK")


@app.command("synth")
@user_errors
def synth_command(
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Folder for the synthetic refer-layout dataset and its images.")],
    images: Annotated[int, typer.Option("--images", help="Number of images.")] = 1200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same files).")] = 0,
) -> None:
    """Write a synthetic referring dataset in the refer-toolkit layout (for the quickstart and tests)."""
    refer_root = api.synth(out, images=images, seed=seed, progress=True)
    typer.echo(f"wrote {images} images; build shards with:\n  sgdata build refcoco --refer-root {refer_root} "
               f"--images {Path(out) / 'images'} --dataset synthref --split-by unc --out SHARDS")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (test runners swap it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> None:
    """The library's log records on stderr as `sgdata: ...`: warnings by default, everything (with the
    traceback of each failed shard) when SGDATA_DEBUG is set."""
    logger = logging.getLogger("sgdata")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("sgdata: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if os.environ.get("SGDATA_DEBUG") else logging.WARNING)


@app.callback()
def _setup() -> None:
    configure_logging()


def main() -> None:
    app(prog_name="sgdata")


if __name__ == "__main__":
    main()

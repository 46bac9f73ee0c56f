"""`sgmodel` command line: train, evaluate, predict, serve.

`train` and `evaluate` hand their arguments, `--help` included, to `python -m sgmodel.train` and
`python -m sgmodel.evaluate` (train takes any config field as `--field value`, so its options are the
config's); `predict` and `serve` are defined here. `torchrun -m sgmodel.train` keeps working because
the modules keep their own entry points.

Exit status: 0 success; 1 the work ran but something was skipped (an unreadable image among many);
2 a user error, printed as one sentence without a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sgdata.format.errors import UserError

app = typer.Typer(
    name="sgmodel", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    help="Train, evaluate and use Shatter-and-Gather referring segmentation models.",
)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

Checkpoint = Annotated[str, typer.Option("--checkpoint", help="A checkpoint.pt (or the run folder holding it).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]


def user_errors(fn):
    """Turn UserError into its one sentence on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train on sgdata shards (one process, or every rank under torchrun); any config field as --field value."""
    from sgmodel.train import main as train_main

    raise typer.Exit(train_main(list(ctx.args)))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Score a checkpoint on referring shards: mIoU, cIoU, PointM, Prec@0.5..0.9 (metrics.json)."""
    from sgmodel.evaluate import main as evaluate_main

    raise typer.Exit(evaluate_main(list(ctx.args)))


@app.command()
@user_errors
def predict(
    checkpoint: Checkpoint,
    text: Annotated[list[str], typer.Option("--text", help="A referring phrase; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help=(
        "Mask PNG for one image and one phrase; otherwise a folder: <image stem>-<i>.png per phrase i, "
        "<image stem>-overlay.png."))],
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="An image file; repeat for several.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="A folder: every image file in it.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    device: Device = "auto",
) -> None:
    """Segment what each phrase refers to in each image; write binary mask PNGs and overlays."""
    from sgmodel.logs import configure_logging
    from sgmodel.predict import image_files, predict_files

    configure_logging()  # predict reports its files and skipped images through the sgmodel logger
    files = image_files(image or [], images)
    raise typer.Exit(predict_files(checkpoint, files, text, out, device, batch_size))


@app.command()
@user_errors
def serve(
    checkpoint: Checkpoint,
    host: Annotated[str, typer.Option("--host", help=(
        "Address to listen on. The default serves this machine only; 0.0.0.0 opens the page to the network."))] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    examples: Annotated[Optional[Path], typer.Option("--examples", help=(
        "Folder for the example pictures (made from the synthetic set at first start); "
        "default: ~/.cache/sgmodel/examples."))] = None,
    device: Device = "auto",
) -> None:
    """Open a page in the browser: upload or pick an image, type phrases, see masks, slot maps and gather weights."""
    from sgmodel.serve import serve as run_server

    run_server(checkpoint, host=host, port=port, examples_dir=examples, device=device)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv) and return its exit status."""
    try:
        app(args=argv, prog_name="sgmodel")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

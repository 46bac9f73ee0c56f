"""sgdata: turn referring-expression datasets and image-caption corpora into sharded WebDataset tars.

The library imports without Ray or typer; `sgdata.cli` is the thin command-line layer and the Ray
runner imports Ray only when it is used.
"""

__version__ = "0.1.0"

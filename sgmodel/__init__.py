"""sgmodel: the Shatter-and-Gather network, its streaming trainer, evaluation and prediction.

The library imports without a GPU or typer; `sgmodel.train`, `sgmodel.evaluate` and `sgmodel.predict`
are thin entry points over it.
"""

__version__ = "0.1.0"

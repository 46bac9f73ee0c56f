"""How the entry points show what the library logs (library modules only call `logging.getLogger(__name__)`).

Messages go to stderr as plain lines, the same lines a user saw before logging existed. Under
torchrun every rank runs the same code, so by default only rank 0 speaks; the other ranks show
errors only (a rank that fails still says why). `rank_file` adds a full log per rank, for the
problems that happen on one rank only.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

PACKAGE_LOGGER = "sgmodel"
_OWN = "_sgmodel_handler"  # marks the handlers configure_logging added, so a second call replaces them


def current_rank() -> int:
    """This process's rank: from the process group once joined, else from torchrun's environment."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def configure_logging(rank: int | None = None, rank_file: str | Path | None = None) -> logging.Logger:
    """Route the `sgmodel` loggers: INFO to stderr on rank 0, ERROR on other ranks, plus INFO and
    above of this rank to `rank_file` when given. Safe to call again (e.g. once the run folder is
    known): earlier handlers are replaced, and stderr is looked up anew."""
    rank = current_rank() if rank is None else rank
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, _OWN, False)]:
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers: list[logging.Handler] = [console]
    if rank_file is not None:
        Path(rank_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(rank_file, encoding="utf-8")
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    for handler in handlers:
        setattr(handler, _OWN, True)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the lines appear once, whatever the root logger does
    return logger


def rank_log_path(out: str | Path, rank: int) -> Path:
    """Where `rank_logs` puts rank r's log: RUN/logs/rank-<r>.log."""
    return Path(out) / "logs" / f"rank-{rank}.log"

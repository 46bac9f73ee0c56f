"""Set before any test module is imported: no model hub is reached, and torch keeps to one thread.

The tests run on two shared cores and start their own worker processes; one intra-op thread per
process keeps them from oversubscribing the machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

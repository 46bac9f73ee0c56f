"""The exceptions of the data contract, shared by sgdata and sgmodel.

Three kinds of trouble, three types, so each caller knows what to do with it:

- `UserError`: the input as a whole is unusable (missing folder, bad option, corrupt checkpoint).
  Entry points print its one-sentence message without a traceback and exit with status 2.
- `SampleError`: one sample cannot be produced; a build records it as a failure and goes on.
- `SegmentationError`: a segmentation yields no mask (malformed RLE, no usable polygon). It is a
  `ValueError`, so code that only knows "bad value" still catches it.
"""

from __future__ import annotations


class UserError(Exception):
    """A fatal problem with the user's input (missing root, bad option, corrupt checkpoint...).

    The message is one sentence that says what is wrong and, where it helps, what to do.
    The CLIs print it without a traceback and exit with status 2.
    """


class SampleError(Exception):
    """A whole sample cannot be produced; the runner records it as a Failure and goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short machine-readable reason, e.g. "unreadable_image"
        self.detail = detail  # one human sentence


class SegmentationError(ValueError):
    """A segmentation that yields no mask (no polygon part with 3 points, malformed RLE)."""

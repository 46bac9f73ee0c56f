"""What both caption layouts share: the text rules and how paths are shown.

Captions are stripped; blank ones and exact repeats within one image are dropped. Paths and texts
that are not valid UTF-8 (bytes surrogate-escaped by the OS or the CSV reader, JSON "\\ud800"
escapes) are shown with escapes in failures and refused as captions.
"""

from __future__ import annotations

import os
import re

SPLIT = "train"  # a caption corpus has one split


def display_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by os) shown as \\xNN.

    Any other lone surrogate (a JSON "\\ud800" escape in a table) is shown as \\uNNNN.
    """
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def clean_captions(values: list[str]) -> list[str]:
    """Stripped, non-blank, first occurrence of each: the captions one image keeps."""
    out: list[str] = []
    for value in values:
        text = value.strip()
        if text and text not in out:
            out.append(text)
    return out


def has_undecodable(texts: list[str]) -> bool:
    """Lone surrogates come from bytes that were not UTF-8 (or from JSON \\ud800 escapes)."""
    return any(re.search("[\ud800-\udfff]", text) for text in texts)

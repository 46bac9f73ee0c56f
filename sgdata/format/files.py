"""Atomic file writes: the one way sgdata and sgmodel replace a file readers may be looking at.

Every write goes to a hidden temporary in the same folder, named `.<final name>.tmp-<host>-<pid>`,
is flushed and fsynced, then renamed over the final name (`os.replace` is atomic on POSIX). A reader
therefore sees the old file or the new one, never a torn one, and two processes writing the same
file (two builds on one network folder, two runs filling one feature cache) never mix their bytes,
because host and process id keep their temporaries apart. A write that fails removes its temporary;
only a process killed outright leaves one behind, which `is_temporary` recognises (sgdata's build
and verify clean or report them; a file with a single writer, such as a checkpoint, removes its own
with `remove_temporaries` before the next write).

`fsync_dir` makes renames durable: the data is fsynced before the rename, but the rename itself
lives in the folder, so writers call it once after their last rename where a machine crash must not
undo the write (a build after its last shard, a checkpoint after each save).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_MARK = ".tmp-"  # temporaries are hidden files named `.<final name>.tmp-<host>-<pid>`

# How index files write text with lone surrogates (a file name that is not UTF-8, as Python's os
# functions give it): as the JSON escape "\\udcxx", so a failure naming such a file is still written.
JSON_TEXT_ERRORS = "backslashreplace"


def temporary_name(final: str | Path) -> Path:
    """The temporary a write of `final` goes through: hidden, beside it, unique per host and process."""
    final = Path(final)
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    return final.with_name(f".{final.name}{TMP_MARK}{host}-{os.getpid()}")


def is_temporary(name: str) -> bool:
    """True for a file name `temporary_name` makes (a write in progress, or one killed half-way)."""
    return name.startswith(".") and TMP_MARK in name


def remove_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries that killed writes of `path` left beside it (any host, any process); return them.

    Only for a file with one writer at a time (a run's checkpoint): where several processes may be
    writing the same file, their temporaries are work in progress, not leftovers.
    """
    path = Path(path)
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def fsync_dir(path: str | Path) -> None:
    """Make the renames in folder `path` durable (a no-op where the filesystem refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None,
                 errors: str | None = None, durable: bool = False) -> Iterator[IO]:
    """Open `path` for writing through its temporary; on leaving the block: flush, fsync, rename.

    An exception inside the block removes the temporary and leaves `path` as it was. `durable`
    also fsyncs the folder after the rename (see the module docstring for when that matters).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding, errors=errors) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = False) -> None:
    """`data` to `path` through `atomic_write`."""
    with atomic_write(path, "wb", durable=durable) as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """UTF-8 `text` to `path` through `atomic_write` (lone surrogates escaped, see JSON_TEXT_ERRORS)."""
    with atomic_write(path, "w", errors=JSON_TEXT_ERRORS, durable=durable) as f:
        f.write(text)


def json_bytes(obj: Any) -> bytes:
    """`obj` as the index files store it: indented, key-sorted UTF-8 JSON with one trailing newline."""
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    return text.encode("utf-8", errors=JSON_TEXT_ERRORS)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """`obj` as `json_bytes` through `atomic_write`."""
    with atomic_write(path, "wb") as f:
        f.write(json_bytes(obj))

"""Write one output shard: a WebDataset tar plus its part record, both atomically.

Completion rule (what resume and verify rely on): a shard is complete when its tar
`OUT/<split>/<split>-NNNNNN.tar` AND its part `OUT/<split>/parts/<split>-NNNNNN.json` both exist
under their final names and the part's `bytes` equals the tar's size. Order of the steps:

1. the tar is written to a temporary (locally: `.<name>.tmp-<host>-<pid>` beside it, fsynced);
2. the part (manifest rows, failures, counts, sha256 of the tar) is published under its final name;
3. the tar is published under its final name (locally a rename; on object storage one upload,
   which the store shows only once complete; see `sgdata.store`).

A kill between 2 and 3 leaves a part without a tar: the shard counts as missing and is redone.
A partial tar can never appear under its final name because publishing is atomic. Local renames
are made durable by the build, which fsyncs each split's folders once after the last shard (not
every worker after every shard): a machine crash before that can only lose a rename, i.e. mark a
whole shard as not done, and resume redoes it.

The tar bytes depend only on the task's specs and options: POSIX (pax) format (admits long and
non-ASCII names), fixed mtime (0), uid/gid 0, empty user/group names, mode 0444, members in spec
order and, within a sample, in sorted extension order (webdataset's TarWriter order). It is written
with `tarfile` directly: importing webdataset pulls in torch, which would cost every Ray worker
seconds and hundreds of MB for nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from sgdata.format.errors import SampleError
from sgdata.format.shards import is_valid_key
from sgdata.sources.base import Failure, Finalized, SampleSpec
from sgdata.store import Store

SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")


@dataclass
class ShardTask:
    """One unit of parallel work: the specs of one output shard (plain data, pickles into a Ray task)."""

    split: str
    index: int
    specs: list[SampleSpec]
    out_dir: str  # the dataset root OUT, a path or a storage URL (the shard goes to OUT/<split>/)
    kind: str  # the source kind, handed to make_sample
    options: Any  # sgdata.samples.SampleOptions
    digest: str = ""  # specs_digest(specs) when the planner already computed it (the worker then need not)

    def specs_digest(self) -> str:
        return self.digest or specs_digest(self.specs)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_file(split: str, index: int) -> str:
    """The shard's name inside OUT."""
    return f"{split}/{shard_name(split, index)}"


def part_file(split: str, index: int) -> str:
    """The shard's part record's name inside OUT."""
    return f"{split}/parts/{split}-{index:06d}.json"


def specs_digest(specs: list[SampleSpec]) -> str:
    """A fingerprint of what a shard was planned to hold; resume redoes a shard whose plan changed."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(json.dumps([spec.key, spec.image_path, spec.record], sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def shard_is_complete(store: Store, split: str, index: int, digest: str | None = None) -> bool:
    """True when tar and part exist, the part's byte count matches the tar and (if given) the plan digest."""
    size = store.size(shard_file(split, index))
    if size is None:
        return False
    try:
        record = json.loads(store.read_text(part_file(split, index)))
    except (OSError, ValueError):  # FileNotFoundError included
        return False
    if record.get("bytes") != size:
        return False
    return digest is None or record.get("specs_digest") == digest


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it (one pass over the bytes)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends on name and size only (reproducible bytes)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# Exceptions that say the machine is in trouble, not the sample: they fail the shard so it is retried.
ENVIRONMENT_ERRORS = (OSError, MemoryError)
COPY_BUFFER_BYTES = 64 << 20
MAX_DETAIL_CHARS = 300


def one_line(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """A failure detail on one line and at most `limit` characters (exception messages can be anything)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _default_make_sample(kind: str, spec: SampleSpec, options: Any) -> Finalized:
    """The real per-sample work, with every fault of the sample's own data turned into a SampleError.

    A source checks what it can while planning, but the data can still hold something no check
    foresaw (text that cannot be written, a value of an unexpected type). Such an exception belongs
    to this one sample: it becomes a `sample_error` failure naming the exception, and the shard's
    other samples are kept. Environment errors (I/O, memory) still fail the shard, so it is retried.
    """
    from sgdata.samples import make_sample  # imported late: writer tests inject their own

    try:
        return make_sample(kind, spec, options)
    except (SampleError, *ENVIRONMENT_ERRORS):
        raise
    except Exception as exc:
        raise SampleError("sample_error", one_line(f"{type(exc).__name__}: {exc}")) from exc


def _manifest_row(key: str, shard: str, fin: Finalized) -> dict[str, Any]:
    width, height = getattr(fin, "width", None), getattr(fin, "height", None)
    if (width is None or height is None) and "json" in fin.files:
        meta = json.loads(fin.files["json"])  # both sample kinds record the stored size in their json
        width, height = meta.get("width"), meta.get("height")
    return {
        "key": key,
        "shard": shard,
        "source_id": str(fin.source_id),
        "width": int(width) if width is not None else -1,
        "height": int(height) if height is not None else -1,
        "num_texts": len(fin.texts),
        "texts": list(fin.texts),
    }


def write_shard(
    task: ShardTask,
    make_sample: Callable[[str, SampleSpec, Any], Finalized] = _default_make_sample,
) -> dict[str, Any]:
    """Produce the shard of `task` and return its part record (also written to the parts folder).

    A `SampleError` skips that sample and becomes a failure entry (the default `make_sample` turns
    every fault of a sample's data into one); any other exception is an infrastructure fault or a
    bug and propagates, so the runner retries the whole shard.
    """
    start = time.perf_counter()
    name = shard_name(task.split, task.index)
    store = Store(task.out_dir)
    store.make_folder(f"{task.split}/parts")

    rows: list[dict[str, Any]] = []
    failures: list[Failure] = []
    extensions: list[str] | None = None
    with store.writing(shard_file(task.split, task.index)) as raw:  # published when this block ends
        hashing = _HashingFile(raw)
        # one read and one write per member (the default copies in 16 KiB chunks: 10x the calls)
        tar = tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_BUFFER_BYTES)
        for spec in task.specs:
            assert is_valid_key(spec.key), f"sample key {spec.key!r} is empty or contains a dot"
            try:
                fin = make_sample(task.kind, spec, task.options)
            except SampleError as e:
                failures.append(Failure(spec.image_path, e.reason, e.detail, task.split))
                continue
            exts = sorted(fin.files)
            if extensions is None:
                extensions = exts
            elif exts != extensions:  # HF datasets infers columns from the first samples
                raise ValueError(f"sample {spec.key} has extensions {exts}, shard has {extensions}")
            for ext in exts:
                tar.addfile(_member(f"{spec.key}.{ext}", len(fin.files[ext])), io.BytesIO(fin.files[ext]))
            rows.append(_manifest_row(spec.key, name, fin))
            for failure in fin.failures:
                failure.split = failure.split or task.split
                failures.append(failure)
        tar.close()
        record = {
            "split": task.split,
            "index": task.index,
            "shard": name,
            "specs_digest": task.specs_digest(),
            "planned": len(task.specs),
            "samples": len(rows),
            "texts": sum(r["num_texts"] for r in rows),
            "extensions": extensions or [],
            "bytes": hashing.size,
            "sha256": hashing.sha.hexdigest(),
            "seconds": round(time.perf_counter() - start, 4),
            "rows": rows,
            "failures": [f.to_json() for f in failures],
        }
        store.write_json(part_file(task.split, task.index), record)  # the part first: see the module docstring
    return record

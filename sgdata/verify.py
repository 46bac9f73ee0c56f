"""Integrity check of a built dataset: every problem is a line that names the bad file.

Checked per split of `dataset.json`: each expected shard and its part exist; the tar's sha256 and
size match its part record; the tar opens and reads to the end; its samples are exactly the
manifest's keys for that shard, in order, each with the part's extensions; the manifest's row count
matches the card; no temporary or unlisted tar is left in the split folder.

OUT may be a storage URL (`s3://bucket/prefix`): each tar is then read once, hashed and parsed in the
same pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from sgdata.format.errors import UserError
from sgdata.format.files import is_temporary
from sgdata.format.shards import iter_tar_samples
from sgdata.store import Store
from sgdata.writer import SHARD_RE, part_file, shard_file, shard_name


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what is read through it (verify reads each tar once)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)

    def finish(self) -> str:
        """Hash what the tar reader left unread (end-of-archive padding) and return the digest."""
        for block in iter(lambda: self.f.read(1 << 20), b""):
            self.sha.update(block)
        return self.sha.hexdigest()


def _manifest_keys(store: Store, name: str) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(name)), columns=["key", "shard"])
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        by_shard[shard].append(key)
    return by_shard


def _verify_shard(store: Store, split: str, index: int, manifest_keys: list[str]) -> list[str]:
    where = shard_file(split, index)
    part = part_file(split, index)
    size = store.size(where)
    if size is None:
        return [f"{where}: missing"]
    if not store.is_file(part):
        return [f"{where}: its part record {part} is missing"]
    try:
        record = json.loads(store.read_text(part))
    except ValueError:
        return [f"{where}: its part record {part} is not valid JSON"]
    problems = []
    if size != record.get("bytes"):
        problems.append(f"{where}: {size} bytes, its part record says {record.get('bytes')} (truncated or replaced)")
    with store.open(where) as raw:
        reader = _HashingReader(raw)
        try:
            samples = list(iter_tar_samples(io.BufferedReader(reader, 1 << 20)))
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            samples, unreadable = None, f"{where}: does not open as a complete tar ({e})"
        digest = reader.finish()
    if digest != record.get("sha256"):
        problems.append(f"{where}: sha256 differs from its part record (tampered or corrupt)")
    if samples is None:
        return problems + [unreadable]
    keys = [key for key, _ in samples]
    if keys != manifest_keys:
        missing = sorted(set(manifest_keys) - set(keys))
        extra = sorted(set(keys) - set(manifest_keys))
        problems.append(f"{where}: samples differ from the manifest (missing {missing[:3]}, unlisted {extra[:3]})")
    if keys != [row["key"] for row in record.get("rows", [])]:
        problems.append(f"{where}: samples differ from its part record")
    expected_ext = sorted(record.get("extensions", []))
    for key, files in samples:
        if sorted(files) != expected_ext:
            problems.append(f"{where}: sample {key} has {sorted(files)}, expected {expected_ext}")
            break
    return problems


def verify_dataset(out: str | Path) -> list[str]:
    """Return the problems found in the dataset at `out` (a folder or a storage URL; empty: all good)."""
    store = Store(out)
    with store.reaching():
        return _verify(store)


def _verify(store: Store) -> list[str]:
    if not store.is_folder():
        raise UserError(f"{store.url()} is not a folder: give the --out folder of a build.")
    if not store.is_file("dataset.json"):
        return [f"{store.url()}: no dataset.json (the build did not finish; rerun its command)"]
    try:
        card = json.loads(store.read_text("dataset.json"))
    except ValueError:
        return [f"{store.url('dataset.json')}: not valid JSON"]
    problems = []
    for name in store.entries()[0]:
        if is_temporary(name):
            problems.append(f"{name}: stray temporary file")
    for split, info in sorted(card.get("splits", {}).items()):
        num_shards = int(info.get("shards", 0))
        try:
            by_shard = _manifest_keys(store, f"{split}/manifest.parquet")
        except Exception as e:  # missing or unreadable parquet: one line, go on with the other splits
            problems.append(f"{split}/manifest.parquet: unreadable ({type(e).__name__})")
            continue
        rows = sum(len(keys) for keys in by_shard.values())
        if rows != info.get("samples"):
            problems.append(f"{split}/manifest.parquet: {rows} rows, dataset.json says {info.get('samples')}")
        expected = {shard_name(split, i) for i in range(num_shards)}
        for name in sorted(set(by_shard) - expected):
            problems.append(f"{split}/manifest.parquet: lists {name}, which is not a shard of this build")
        for index in range(num_shards):
            problems += _verify_shard(store, split, index, by_shard.get(shard_name(split, index), []))
        for folder in (split, f"{split}/parts"):
            for name in store.entries(folder)[0]:
                if is_temporary(name):
                    problems.append(f"{folder}/{name}: stray temporary file")
                elif folder == split and SHARD_RE.match(name) and name not in expected:
                    problems.append(f"{folder}/{name}: shard not listed in dataset.json")
        if not info.get("complete", True):
            problems.append(f"{split}: the build left shards unfinished; rerun its command")
    return problems

"""Integrity check of a built dataset: every problem is a line that names the bad file.

Checked per split of `dataset.json`: each expected shard and its part exist; the tar's sha256 and
size match its part record; the tar opens and reads to the end; its samples are exactly the
manifest's keys for that shard, in order, each with the part's extensions; the manifest's row count
matches the card; no temporary or unlisted tar is left in the split folder.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from sgdata.format.errors import UserError
from sgdata.format.files import is_temporary
from sgdata.format.shards import iter_tar_samples
from sgdata.writer import SHARD_RE, part_path, shard_name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_keys(path: Path) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key", "shard"])
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        by_shard[shard].append(key)
    return by_shard


def _verify_shard(out: Path, split: str, index: int, manifest_keys: list[str]) -> list[str]:
    name = shard_name(split, index)
    tar, part = out / split / name, part_path(out, split, index)
    where = f"{split}/{name}"
    if not tar.is_file():
        return [f"{where}: missing"]
    if not part.is_file():
        return [f"{where}: its part record {part.relative_to(out)} is missing"]
    try:
        record = json.loads(part.read_text())
    except ValueError:
        return [f"{where}: its part record {part.relative_to(out)} is not valid JSON"]
    problems = []
    size = tar.stat().st_size
    if size != record.get("bytes"):
        problems.append(f"{where}: {size} bytes, its part record says {record.get('bytes')} (truncated or replaced)")
    if _sha256(tar) != record.get("sha256"):
        problems.append(f"{where}: sha256 differs from its part record (tampered or corrupt)")
    try:
        samples = list(iter_tar_samples(tar))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        return problems + [f"{where}: does not open as a complete tar ({e})"]
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
    """Return the problems found in the dataset at `out` (empty: every shard is whole and listed)."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder: give the --out folder of a build.")
    card_path = out / "dataset.json"
    if not card_path.is_file():
        return [f"{out}: no dataset.json (the build did not finish; rerun its command)"]
    try:
        card = json.loads(card_path.read_text())
    except ValueError:
        return [f"{card_path}: not valid JSON"]
    problems = []
    for entry in sorted(out.iterdir()):
        if is_temporary(entry.name):
            problems.append(f"{entry.name}: stray temporary file")
    for split, info in sorted(card.get("splits", {}).items()):
        split_dir = out / split
        num_shards = int(info.get("shards", 0))
        try:
            by_shard = _manifest_keys(split_dir / "manifest.parquet")
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
            problems += _verify_shard(out, split, index, by_shard.get(shard_name(split, index), []))
        if split_dir.is_dir():
            for folder in (split_dir, split_dir / "parts"):
                for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                    rel = f.relative_to(out)
                    if is_temporary(f.name):
                        problems.append(f"{rel}: stray temporary file")
                    elif folder == split_dir and SHARD_RE.match(f.name) and f.name not in expected:
                        problems.append(f"{rel}: shard not listed in dataset.json")
        if not info.get("complete", True):
            problems.append(f"{split}: the build left shards unfinished; rerun its command")
    return problems

"""Shards: how a sample's key is read off a tar member, and how a shard spec names shard files.

The key rule (WebDataset's): a member `dir/img000042.json` belongs to sample `dir/img000042`, the
extension being everything after the *first* dot of the file name. Keys are therefore dotless, and
the members of one sample are consecutive in the tar.

A shard spec (the one grammar of `sgdata inspect SHARDS`, `--shards` and `--train-shards`):

    spec   := part ( "," part )*          commas inside {braces} do not split; "::" also splits
    part   := source [ ":" weight ]       weights only in a mixture, and then on every part
    source := a directory                 a dataset folder (dataset.json): its splits' shards;
                                          any other folder: every .tar below it (hidden files skipped)
            | a glob                      shards/train-*.tar (matching .tar files)
            | a brace pattern             train-{000000..000009}.tar, expanded by `braceexpand`,
                                          the expansion WebDataset uses: every name must exist
            | a file                      one .tar

Every source may also be a URL of object storage (`s3://bucket/shards/train`, `gs://...`; see
`sgdata.format.storage`): a prefix is listed like a folder, globs and brace patterns match keys.
Paths come back as strings in a stable order (what WebDataset takes); a shard named twice is read once.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Iterator

from braceexpand import braceexpand

from sgdata.format.errors import UserError
from sgdata.format.storage import filesystem, is_url, local_path, open_shard, reaching

DATASET_CARD = "dataset.json"  # the file that makes a folder a dataset folder
_WEIGHT = re.compile(r"^(?P<spec>.+):(?P<weight>\d+(?:\.\d*)?|\.\d+)$")


# ---- the key rule ----------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension): the key is everything up to the file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (f"{folder}/{stem}" if folder else stem), ext


def is_valid_key(key: str) -> bool:
    """True for a key the rule reads back unchanged: non-empty, and no dot in its file-name part."""
    return bool(key) and "." not in key.rpartition("/")[2]


def iter_tar_samples(shard: str | Path | IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, grouping consecutive members as WebDataset does.

    `shard` is a path, a storage URL or an open binary stream. The tar is read once, front to back
    (tarfile's stream mode), so a remote shard is not fetched twice; every member is read fully, so
    a truncated tar raises (tarfile.ReadError or EOFError).
    """
    if isinstance(shard, (str, Path)):
        with open_shard(shard) as stream:
            yield from iter_tar_samples(stream)
        return
    key, files = None, {}
    with tarfile.open(fileobj=shard, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = split_member_name(member.name)
            if member_key != key and key is not None:
                yield key, files
                files = {}
            key = member_key
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            files[ext] = data
    if key is not None:
        yield key, files


# ---- shard specs ---------------------------------------------------------------------------------


def split_spec(spec: str) -> list[str]:
    """A spec's parts: split on "::" and on commas that are not inside a {brace,pattern}."""
    parts, depth, current = [], 0, []
    for ch in (spec or "").replace("::", ","):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _folder_shards(path: Path) -> list[str]:
    card = path / DATASET_CARD
    if card.is_file():
        try:
            splits = json.loads(card.read_text()).get("splits", {})
        except (OSError, ValueError, AttributeError):
            splits = {}
        if splits:
            return [str(t) for split in sorted(splits) for t in sorted((path / split).glob(f"{split}-*.tar"))]
    return sorted(str(p) for p in path.rglob("*.tar") if p.is_file() and not p.name.startswith("."))


def _expand_source(part: str) -> list[str]:
    if is_url(part):
        with reaching(part):
            return _expand_url(part)
    part = local_path(part)
    path = Path(part).expanduser()
    if path.is_dir():
        return _folder_shards(path)
    names = list(braceexpand(str(path))) if "{" in part else [str(path)]
    if any(ch in part for ch in "*?["):
        return sorted(p for name in names for p in glob.glob(name, recursive=True) if p.endswith(".tar") and os.path.isfile(p))
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist" + (f" (and {len(missing) - 1} more of {part!r})" if len(missing) > 1 else ""))
    return names


def _expand_url(part: str) -> list[str]:
    """The same rules on object storage: a prefix is a folder, globs and brace patterns match keys."""
    fs, path = filesystem(part)
    names = list(braceexpand(path)) if "{" in path else [path]
    if any(ch in path for ch in "*?["):
        found = sorted(p for name in names for p in fs.glob(name) if p.endswith(".tar"))
    elif len(names) == 1 and fs.isdir(path):
        found = _url_folder_shards(fs, path.rstrip("/"))
    else:
        missing = [n for n in names if not fs.isfile(n)]
        if missing:
            raise UserError(f"shard {fs.unstrip_protocol(missing[0])} does not exist"
                            + (f" (and {len(missing) - 1} more of {part!r})" if len(missing) > 1 else ""))
        found = names
    return [fs.unstrip_protocol(p) for p in found]


def _url_folder_shards(fs, path: str) -> list[str]:
    try:
        splits = json.loads(fs.cat_file(f"{path}/{DATASET_CARD}")).get("splits", {})
    except (FileNotFoundError, ValueError, AttributeError):
        splits = {}
    if splits:
        return [t for split in sorted(splits) for t in sorted(fs.glob(f"{path}/{split}/{split}-*.tar"))]
    return sorted(p for p in fs.find(path) if p.endswith(".tar") and not p.rpartition("/")[2].startswith("."))


def _no_match(spec: str) -> UserError:
    return UserError(f"no shards match {spec!r}; give a directory, a glob, a brace pattern or a comma-separated list of .tar files")


def expand_shards(spec: str | Path) -> list[str]:
    """A shard spec without weights -> the .tar paths it names (see the module docstring)."""
    urls: list[str] = []
    for part in split_spec(str(spec or "")):
        urls.extend(_expand_source(part))
    urls = list(dict.fromkeys(urls))  # a shard named twice is read once
    if not urls:
        raise _no_match(str(spec or ""))
    return urls


def parse_mixture(spec: str) -> list[tuple[list[str], float]]:
    """A shard spec, weighted or not -> [(shard paths, weight)].

    Without weights the whole spec is one shard set of weight 1. A mixture gives every part a weight
    after a colon, e.g. `shards/refcoco/train:0.5,shards/captions/train:0.5`: each step's images are
    drawn from set i with probability weight_i / sum(weights).
    """
    parts = split_spec(spec)
    weighted = [_WEIGHT.match(p) for p in parts]
    if not any(weighted):
        return [(expand_shards(spec), 1.0)]
    if not all(weighted):
        bare = parts[weighted.index(None)]
        raise UserError(f"in a shard mixture every part needs a weight (e.g. {bare}:0.5); {bare!r} has none")
    mixture = [(expand_shards(m["spec"]), float(m["weight"])) for m in weighted]
    if sum(w for _, w in mixture) <= 0:
        raise UserError(f"the weights of shard mixture {spec!r} sum to zero")
    return mixture

"""Caption corpora: a folder tree of images with same-stem captions, or a table of (image path, caption) rows.

Real corpora are messy, so planning reads every caption up front (they are small) and turns each
problem into a `Failure` instead of an exception: the build then knows exactly which images it
will write and why the others were skipped. Images themselves are not opened here; an unreadable
image is found later by `load_image` in the workers.

The two layouts are read by `caption_folder` and `caption_table` (their rules are in their
docstrings, docs/data-format.md and docs/reliability.md); this module turns what they found into
keyed specs and writes each sample.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any

from sgdata.format.errors import SampleError, UserError
from sgdata.sources.base import Failure, Finalized, Option, SampleSpec, SourcePlan, StoredImage
from sgdata.sources.caption_folder import plan_folder
from sgdata.sources.caption_table import TABLE_FORMATS, plan_table
from sgdata.sources.caption_text import SPLIT, display_path
from sgdata.sources.refer_sample import dumps_sample

KEY_STEM_CHARS = 40
KEY_HASH_CHARS = 10


def caption_key(rel_path: str) -> str:
    """`<stem>_<sha1[:10]>`: readable, dotless (WebDataset splits on the first dot), stable across runs.

    The stem is the file name without its extension, reduced to ASCII letters, digits and `_`
    (accents dropped, anything else becomes `_`); the hash of the whole relative path keeps two
    `image.jpg` in different folders apart.
    """
    return _key(rel_path, KEY_HASH_CHARS)


def _key(rel_path: str, hash_chars: int) -> str:
    name = rel_path.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    clean = re.sub(r"[^A-Za-z0-9]+", "_", ascii_stem).strip("_")[:KEY_STEM_CHARS].rstrip("_") or "img"
    digest = hashlib.sha1(rel_path.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{clean}_{digest[:hash_chars]}"


def unique_keys(rel_paths: list[str]) -> dict[str, str]:
    """Keys for distinct relative paths; the rare pair whose 10-hex hashes collide gets the full hash."""
    keys = {rel: caption_key(rel) for rel in rel_paths}
    seen: dict[str, int] = {}
    for key in keys.values():
        seen[key] = seen.get(key, 0) + 1
    for rel, key in keys.items():
        if seen[key] > 1:
            keys[rel] = _key(rel, 40)
    return keys


def _plan(found: dict[str, dict[str, Any]], failures: list[Failure], card: dict[str, Any]) -> SourcePlan:
    """Specs sorted by key; `found` maps each image's relative path to its file and captions."""
    keys = unique_keys(list(found))
    specs = [SampleSpec(key=keys[rel], image_path=entry["path"],
                        record={"source": display_path(rel), "captions": entry["captions"]})
             for rel, entry in found.items()]
    specs.sort(key=lambda spec: spec.key)
    card = {**card, "images": len(specs), "captions": sum(len(spec.record["captions"]) for spec in specs)}
    return SourcePlan(kind="captions", splits={SPLIT: specs}, failures=failures, card=card)


def plan_captions(src: str | Path) -> SourcePlan:
    """Read a caption folder tree or table into one "train" split of specs sorted by key (no image is opened)."""
    src = Path(src).expanduser().absolute()
    if not src.exists():
        raise UserError(f"the caption source {src} does not exist.")
    if src.is_dir():
        return _plan(*plan_folder(src))
    fmt = TABLE_FORMATS.get(src.suffix.lower())
    if fmt is None:
        raise UserError(f"the caption source {src} is neither a folder nor a .jsonl/.csv/.tsv/.parquet table.")
    return _plan(*plan_table(src, fmt))


def finalize(record: dict, image: StoredImage) -> Finalized:
    """`json` {"captions", "height", "source", "width"} (same schema for every sample) and `txt` (first caption)."""
    captions = list(record["captions"])
    if not captions:
        raise SampleError("blank_caption", "the sample has no caption")
    sample = {"source": record["source"], "width": image.width, "height": image.height, "captions": captions}
    return Finalized(files={"json": dumps_sample(sample), "txt": captions[0].encode("utf-8")},
                     texts=captions, source_id=record["source"])


class CaptionSource:
    """`sgdata build captions SRC`: a folder tree or a table of image-caption pairs."""

    name = "captions"
    command = "captions"
    help = "Shards of an image-caption corpus (split \"train\"): one sample per image with all its captions."
    options = (Option("src", "A folder of images with same-stem .txt/.json captions, or a jsonl/csv/tsv/parquet "
                      "table.", "path", required=True, argument=True),)
    layout = ()

    def plan(self, *, src) -> SourcePlan:
        return plan_captions(src)

    finalize = staticmethod(finalize)


SOURCE = CaptionSource()

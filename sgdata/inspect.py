"""Look inside shards: counts, sizes, texts and a few samples (and, via render_grid, a PNG grid).

Reads the tars with `tarfile` directly, so it also works on a dataset whose manifest is missing
or disagrees (verify uses the same reader).
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sgdata.errors import UserError

DATASET_CARD = "dataset.json"


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, grouping consecutive members as webdataset does.

    Reads every member fully, so a truncated tar raises (tarfile.ReadError or EOFError).
    """
    key, files = None, {}
    with tarfile.open(path, "r:") as tar:
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


def expand_shards(spec: str | Path) -> list[Path]:
    """SHARDS: a dataset folder, a split folder, a .tar, a glob or a brace pattern (`x-{000000..000009}.tar`)."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / DATASET_CARD).is_file():
            splits = json.loads((path / DATASET_CARD).read_text()).get("splits", {})
            found = [t for split in sorted(splits) for t in sorted((path / split).glob(f"{split}-*.tar"))]
        else:
            found = sorted(p for p in path.glob("*.tar") if not p.name.startswith("."))
            if not found:
                found = sorted(p for p in path.rglob("*.tar") if not p.name.startswith("."))
    elif path.is_file():
        found = [path]
    else:
        from braceexpand import braceexpand

        found = [Path(p) for pattern in braceexpand(text) for p in sorted(glob.glob(pattern))]
    if not found:
        raise UserError(f"No shards found at {text}: give a dataset or split folder, a .tar file or a pattern.")
    return found


def sample_meta(files: dict[str, bytes]) -> dict[str, Any]:
    try:
        return json.loads(files["json"]) if "json" in files else {}
    except ValueError:
        return {}


def sample_texts(meta: dict[str, Any], files: dict[str, bytes] | None = None) -> list[str]:
    """Every phrase of a sample: referring sentences (refcoco) or captions (captions)."""
    if "refs" in meta:
        return [s["text"] for ref in meta["refs"] for s in ref.get("sentences", [])]
    if "captions" in meta:
        return list(meta["captions"])
    if files and "txt" in files:
        return [files["txt"].decode("utf-8", "replace")]
    return []


def iter_samples(spec: str | Path) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
    for shard in expand_shards(spec):
        for key, files in iter_tar_samples(shard):
            yield shard, key, files


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)}


def inspect_shards(spec: str | Path, examples: int = 3) -> dict[str, Any]:
    """Counts, sizes and texts of the shards at `spec`, and the first `examples` samples."""
    shards = expand_shards(spec)
    extensions: Counter[str] = Counter()
    widths, heights, texts_per_sample, shown, problems = [], [], [], [], []
    samples = 0
    for shard in shards:
        try:
            for key, files in iter_tar_samples(shard):
                samples += 1
                extensions.update(list(files))  # a dict would add its values
                meta = sample_meta(files)
                texts = sample_texts(meta, files)
                texts_per_sample.append(len(texts))
                if "width" in meta and "height" in meta:
                    widths.append(meta["width"])
                    heights.append(meta["height"])
                if len(shown) < examples:
                    shown.append({"shard": shard.name, "key": key, "width": meta.get("width"),
                                  "height": meta.get("height"), "files": sorted(files), "texts": texts})
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            problems.append(f"{shard}: unreadable ({e})")
    return {
        "shards": [str(s) for s in shards],
        "num_shards": len(shards),
        "samples": samples,
        "texts": sum(texts_per_sample),
        "bytes": sum(s.stat().st_size for s in shards),
        "extensions": dict(sorted(extensions.items())),
        "width": _spread(widths),
        "height": _spread(heights),
        "texts_per_sample": _spread(texts_per_sample),
        "examples": shown,
        "problems": problems,
    }


def sample_tile(files: dict[str, bytes], width: int = 256):
    """One grid tile: the image, each ref's mask in its own colour, and its phrases in that colour."""
    import io

    from PIL import Image

    from sgdata.render import caption_tile, color_for, overlay_mask

    meta = sample_meta(files)
    image = Image.open(io.BytesIO(files["jpg"])).convert("RGB")
    lines: list = []
    if "refs" in meta:
        from sgdata.masks import rle_to_mask

        for i, ref in enumerate(meta["refs"]):
            color = color_for(i)
            if ref.get("mask"):
                image = overlay_mask(image, rle_to_mask(ref["mask"]), color, alpha=0.45)
            lines += [(f"{i + 1}. {s['text']}", color) for s in ref.get("sentences", [])]
    else:
        lines = sample_texts(meta, files)
    return caption_tile(image, lines, width=width)


def render_grid(spec: str | Path, path: str | Path, n: int = 16, width: int = 256) -> Path:
    """Draw the first `n` samples of the shards at `spec` as a PNG grid at `path`."""
    from sgdata.render import make_grid

    tiles = []
    for _, _, files in iter_samples(spec):
        tiles.append(sample_tile(files, width))
        if len(tiles) >= n:
            break
    if not tiles:
        raise UserError(f"The shards at {spec} hold no samples to draw.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(tiles).save(path, format="PNG")
    return path

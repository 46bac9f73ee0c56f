"""Look inside shards: counts, sizes, texts and a few samples (and, via render_grid, a PNG grid).

Reads the tars with `tarfile` directly, so it also works on a dataset whose manifest is missing
or disagrees (verify uses the same reader). SHARDS may name object storage (s3://bucket/prefix).
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sgdata.format.drawing import caption_tile, color_for, make_grid, overlay_mask
from sgdata.format.errors import UserError
from sgdata.format.rle import rle_to_mask
from sgdata.format.samples import sample_meta, sample_texts
from sgdata.format.shards import expand_shards, iter_tar_samples
from sgdata.format.storage import reaching
from sgdata.format.storage import stat as shard_stat


def iter_samples(spec: str | Path) -> Iterator[tuple[str, str, dict[str, bytes]]]:
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
                    shown.append({"shard": shard.rpartition("/")[2], "key": key, "width": meta.get("width"),
                                  "height": meta.get("height"), "files": sorted(files), "texts": texts})
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            problems.append(f"{shard}: unreadable ({e})")
    with reaching(str(spec)):
        total_bytes = sum(shard_stat(s)[0] for s in shards)
    return {
        "shards": list(shards),
        "num_shards": len(shards),
        "samples": samples,
        "texts": sum(texts_per_sample),
        "bytes": total_bytes,
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

    meta = sample_meta(files)
    image = Image.open(io.BytesIO(files["jpg"])).convert("RGB")
    lines: list = []
    if "refs" in meta:
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

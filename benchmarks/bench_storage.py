"""Storage: bytes of our shards against the public implementation's layout for the same samples.

The public code stores one uncompressed `.npz` per (image, phrase) holding the decoded image and the
phrase's mask, so an image is stored once per phrase and as raw pixels. The baseline's bytes are
computed exactly: `np.savez` of a (H, W, 3) uint8 image and a (H, W) bool mask (one byte per pixel,
the smallest mask an uncompressed .npz can hold) is written to memory once per distinct image size,
and that size is counted once per phrase of every image of the build.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import result


@lru_cache(maxsize=None)
def npz_bytes(height: int, width: int) -> int:
    """Bytes of one uncompressed .npz holding an (H, W, 3) uint8 image and an (H, W) mask."""
    buffer = io.BytesIO()
    np.savez(buffer, image=np.zeros((height, width, 3), np.uint8), mask=np.zeros((height, width), bool))
    return buffer.getbuffer().nbytes


def phrases_per_image(out: Path) -> list[tuple[int, int, int]]:
    """(height, width, phrases) of every sample in the shards of the build at `out`, from its json."""
    found = []
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    phrases = sum(len(ref["sentences"]) for ref in meta["refs"])
                    found.append((int(meta["height"]), int(meta["width"]), phrases))
    return found


def run(out: Path) -> dict[str, dict[str, Any]]:
    """`out`: a passthrough build (images at their original size, as the public code stores them)."""
    shard_bytes = sum(p.stat().st_size for p in out.glob("*/*.tar"))
    folder_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    samples = phrases_per_image(out)
    if not samples:
        raise RuntimeError(f"no samples found in the shards under {out}")
    baseline = sum(phrases * npz_bytes(h, w) for h, w, phrases in samples)
    phrases = sum(p for _, _, p in samples)
    row = result(
        "storage", shard_bytes, baseline, "bytes",
        images=len(samples), phrases=phrases,
        dataset_folder_bytes=folder_bytes,  # shards + manifests, stats, part records, card
        ratio_with_every_file=round(baseline / folder_bytes, 2),
        bytes_per_image=round(shard_bytes / len(samples)),
        baseline_bytes_per_phrase=round(baseline / phrases),
    )
    return {"storage": row}


if __name__ == "__main__":
    import sys

    print(json.dumps(run(Path(sys.argv[1])), indent=1))

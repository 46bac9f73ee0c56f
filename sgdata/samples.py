"""One sample from one spec: the image through `images.load_image`, the rest through its source's finalize().

This is the whole per-sample work of a build task; it runs in Ray workers (or in-process), so it
takes only plain data and finds the source's finalize() in the registry by the plan's kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from sgdata.images import load_image
from sgdata.sources import registry
from sgdata.sources.base import Finalized, SampleSpec


@dataclass
class SampleOptions:
    """Per-sample build options (recorded in the dataset card by the build)."""

    max_size: int | None = None  # longer image side limit in pixels; None keeps the original size
    max_pixels: int = 80_000_000  # images above this many pixels are refused from their header


def make_sample(kind: str, spec: SampleSpec, options: SampleOptions) -> Finalized:
    """The files of one sample ("jpg" first, then the source's): raises SampleError when it cannot be made."""
    finalize = registry.source(kind).finalize  # a ValueError for a kind no source has
    image = load_image(spec.image_path, max_size=options.max_size, max_pixels=options.max_pixels)
    result = finalize(spec.record, image)
    return Finalized(files={"jpg": image.data, **result.files}, texts=result.texts, source_id=result.source_id,
                     failures=result.failures)

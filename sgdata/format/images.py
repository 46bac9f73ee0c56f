"""Decoding a shard's image: the stored `jpg` member is an upright RGB JPEG (docs/data-format.md)."""

from __future__ import annotations

import io

from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    """Shard `jpg` bytes -> a decoded RGB image (for readers, inspect and the model's loaders)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")

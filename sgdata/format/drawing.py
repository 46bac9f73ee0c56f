"""Drawing masks over images: mask overlays, captioned tiles, grids (PIL only).

Part of the shared surface because both packages show masks the same way: `sgdata inspect --render`
draws ground-truth masks with them, and sgmodel's evaluate/predict overlays draw predicted masks or
soft maps with the same functions and colours.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]
Line = Union[str, tuple[str, Color]]  # a text line, optionally with its colour

# distinct, readable on white and on photos (Tableau-like)
PALETTE: tuple[Color, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
TEXT_COLOR: Color = (20, 20, 20)


def color_for(index: int) -> Color:
    return PALETTE[index % len(PALETTE)]


@functools.lru_cache(maxsize=8)
def get_font(size: int = 12) -> ImageFont.ImageFont:
    """DejaVu Sans from matplotlib (a dependency; covers accented Latin, Greek, Cyrillic), else Pillow's font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def overlay_mask(img: Image.Image, mask: np.ndarray, color: Color, alpha: float = 0.5,
                 outline: bool = True) -> Image.Image:
    """Tint `img` with `color` where `mask` is set; returns a new RGB image.

    `mask` is (H, W) bool or float in [0, 1] (a soft map tints in proportion); it is resized to the
    image with nearest (bool) or bilinear (float) sampling if the sizes differ. `outline` draws the
    boundary of the mask > 0.5 region in full colour, which keeps thin objects visible.
    """
    base = img.convert("RGB")
    weights = np.asarray(mask, dtype=np.float32)  # (H, W)
    if weights.shape != (base.height, base.width):
        resample = Image.NEAREST if mask.dtype == bool else Image.BILINEAR
        weights = np.asarray(Image.fromarray(weights, mode="F").resize(base.size, resample), dtype=np.float32)
    weights = np.clip(weights, 0.0, 1.0)[..., None] * alpha  # (H, W, 1)
    pixels = np.asarray(base, dtype=np.float32)  # (H, W, 3)
    tinted = pixels * (1 - weights) + np.asarray(color, dtype=np.float32) * weights
    if outline:
        inside = weights[..., 0] > 0.5 * alpha  # (H, W)
        edge = np.zeros_like(inside)
        edge[:-1] |= inside[:-1] != inside[1:]
        edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
        tinted[edge] = color
    return Image.fromarray(tinted.round().astype(np.uint8), mode="RGB")


def wrap_text(text: str, font: ImageFont.ImageFont, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; a word longer than the line is cut by characters."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if font.getlength(trial) <= max_width:
            current = trial
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > max_width and len(word) > 1:
            cut = 1
            while cut < len(word) and font.getlength(word[: cut + 1]) <= max_width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def caption_tile(img: Image.Image, lines: Sequence[Line], width: int = 256, font_size: int = 12,
                 max_lines: int = 8, background: Color = (255, 255, 255)) -> Image.Image:
    """The image scaled to `width`, with `lines` word-wrapped beneath it (each in its own colour)."""
    font = get_font(font_size)
    scale = width / img.width
    picture = img.convert("RGB").resize((width, max(1, round(img.height * scale))), Image.BILINEAR)
    wrapped: list[tuple[str, Color]] = []
    for line in lines:
        text, color = (line, TEXT_COLOR) if isinstance(line, str) else line
        wrapped += [(part, color) for part in wrap_text(text, font, width - 8)]
    if len(wrapped) > max_lines:
        wrapped = wrapped[: max_lines - 1] + [(f"… {len(wrapped) - max_lines + 1} more lines", TEXT_COLOR)]
    line_height = font_size + 4
    tile = Image.new("RGB", (width, picture.height + 4 + line_height * len(wrapped)), background)
    tile.paste(picture, (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, (text, color) in enumerate(wrapped):
        draw.text((4, picture.height + 2 + i * line_height), text, fill=color, font=font)
    return tile


def make_grid(tiles: Sequence[Image.Image], cols: int | None = None, pad: int = 6,
              background: Color = (255, 255, 255)) -> Image.Image:
    """Tiles in rows of `cols` (default: about square), each cell as large as the largest tile."""
    if not tiles:
        raise ValueError("make_grid needs at least one tile")
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(tile.convert("RGB"), (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return grid

"""A synthetic referring-segmentation set in the refer toolkit's layout, for the CPU demo and the tests.

Each image shows 3-4 flat-coloured shapes on a textured background; each shape is one COCO
annotation (its polygon is exactly what was painted) and one ref whose phrases single it out
("the red circle", "the triangle", "the blue one", "the leftmost object", "the bigger star").
Distractors share a shape or a colour with the referent so the phrase, not a prior, decides; a
phrase is only written when it picks out exactly one object of its image. Writing the refer layout
(instances.json, refs(unc).p, JPEGs) lets the demo go through `sgdata build refcoco` like real data.
docs/synthetic-data.md explains the choices.

Everything is drawn from numpy Generators seeded by (seed, image id): the same seed gives the same
bytes, and image i does not depend on how many images are asked for.
"""

from __future__ import annotations

import colorsys
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sgdata.format.errors import UserError
from sgdata.format.files import write_bytes_atomic

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {  # saturated, far apart in hue, so that muted backgrounds never match them
    "red": (215, 38, 38),
    "green": (38, 165, 62),
    "blue": (40, 88, 220),
    "yellow": (238, 205, 40),
    "purple": (145, 55, 185),
    "orange": (245, 128, 25),
}
SIZES = ("small", "medium", "large")
SIZE_AREAS = (0.02, 0.035, 0.06)  # share of the image each size class covers (about 1.75x apart)
AREA_JITTER = 0.08  # +-8 %: neighbouring classes stay >= 1.4x apart, so "bigger" is always visible
MIN_GAP = 6  # pixels between object boxes: objects never touch
SIDE_MARGIN = 0.08  # left/right phrases need the centres this share of the width apart
PHRASES_PER_OBJECT = 3
SPLITS = (("train", 0.7), ("val", 0.1), ("testA", 0.1), ("testB", 0.1))
JPEG_QUALITY = 90
PHRASE_TYPES = ("colour+shape", "shape", "colour", "left/right", "bigger/smaller")
# How often each type is picked for an object (among the types that can single it out): relational
# phrases are about a quarter, as on the small-scale scenes the demo's quality floor was set on.
# Image-text matching alone does not ground them: a relational phrase's word-swapped twin ("the circle
# on the right") is nearly always true of the same image too, so a loss over (image, phrase) pairs
# cannot tell the two readings apart; co-reference with the ref's attribute phrases can
# (docs/synthetic-data.md, docs/training.md "Relations").
PHRASE_TYPE_WEIGHTS = {"colour+shape": 3.0, "shape": 2.0, "colour": 2.0, "left/right": 1.0, "bigger/smaller": 1.0}

_SIDE_WORDS = {"left", "right", "leftmost", "rightmost"}
_SIZE_WORDS = {"bigger", "biggest", "larger", "largest", "smaller", "smallest", "big", "small", "large", "tiny"}


@dataclass
class SceneObject:
    """One painted shape: its attributes and the polygon that was filled (x, y pixel coordinates)."""

    shape: str
    colour: str
    size: int  # index into SIZES
    polygon: np.ndarray  # (P, 2) float, rounded to 0.01 px: the stored and the painted outline
    phrases: list[tuple[str, str]] = field(default_factory=list)  # (text, phrase type)

    @property
    def cx(self) -> float:
        return float(self.polygon[:, 0].mean())

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the polygon."""
        (x0, y0), (x1, y1) = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


# ---------------------------------------------------------------- shapes and scenes


def _unit_polygon(shape: str) -> np.ndarray:
    """The shape around (0, 0) with outer radius 1, y pointing down, upright. (P, 2)"""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = np.ones(32)
    elif shape == "square":
        angles = np.deg2rad([45, 135, 225, 315])
        radii = np.ones(4)
    elif shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        radii = np.ones(3)
    elif shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.tile([1.0, 0.5], 5)
    elif shape == "diamond":  # a rhombus taller than wide: not a turned square
        return np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], dtype=float)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area of a simple polygon (P, 2)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _shape_polygon(rng: np.random.Generator, shape: str, size: int, image_area: float) -> np.ndarray:
    """The shape scaled to its size class's area, turned a little (a square never becomes a diamond). (P, 2)"""
    unit = _unit_polygon(shape)
    target = SIZE_AREAS[size] * image_area * rng.uniform(1 - AREA_JITTER, 1 + AREA_JITTER)
    turn = np.deg2rad(rng.uniform(-12, 12))
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return unit @ rotation.T * np.sqrt(target / polygon_area(unit))


def _place(rng: np.random.Generator, outlines: list[np.ndarray], width: int, height: int) -> list[np.ndarray] | None:
    """Centre each outline (largest first) where its box keeps MIN_GAP from the others; None if it does not fit."""
    boxes: list[tuple[float, float, float, float]] = []
    placed: list[np.ndarray | None] = [None] * len(outlines)
    for index in sorted(range(len(outlines)), key=lambda i: -polygon_area(outlines[i])):
        outline = outlines[index]
        (lx, ly), (hx, hy) = outline.min(axis=0), outline.max(axis=0)
        for _ in range(60):
            cx = rng.uniform(MIN_GAP - lx, width - MIN_GAP - hx)
            cy = rng.uniform(MIN_GAP - ly, height - MIN_GAP - hy)
            box = (cx + lx, cy + ly, cx + hx, cy + hy)
            if all(box[0] > b[2] + MIN_GAP or box[2] < b[0] - MIN_GAP or box[1] > b[3] + MIN_GAP
                   or box[3] < b[1] - MIN_GAP for b in boxes):
                boxes.append(box)
                placed[index] = np.round(outline + [cx, cy], 2)
                break
        else:
            return None
    return placed  # type: ignore[return-value]


def make_scene(rng: np.random.Generator, width: int, height: int) -> list[SceneObject]:
    """3-4 objects with distinct (colour, shape) pairs drawn from small palettes, so attributes repeat.

    Palettes of 2-4 shapes and 2-4 colours make it likely that two objects share a shape or a
    colour: then "the circle" is ambiguous and the phrase has to say which one.
    """
    while True:
        count = int(rng.integers(3, 5))
        shapes = rng.choice(SHAPES, size=int(rng.integers(2, count + 1)), replace=False)
        colours = rng.choice(list(COLOURS), size=int(rng.integers(2, count + 1)), replace=False)
        pairs = [(str(s), str(c)) for s in shapes for c in colours]
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
        sizes = [int(s) for s in rng.integers(0, len(SIZES), size=count)]
        outlines = [_shape_polygon(rng, shape, size, width * height) for (shape, _), size in zip(chosen, sizes)]
        placed = _place(rng, outlines, width, height)
        if placed is not None:
            objects = [SceneObject(shape, colour, size, polygon)
                       for (shape, colour), size, polygon in zip(chosen, sizes, placed)]
            describe(objects, width, rng)
            return objects


# ---------------------------------------------------------------- phrases


def _extreme(objects: list[SceneObject], target: SceneObject, value, margin: float) -> bool:
    """Whether `target`'s value beats every other object's by at least `margin`."""
    return all(value(target) >= value(other) + margin for other in objects if other is not target)


def _relational(group: list[SceneObject], target: SceneObject, nouns: list[str], width: int) -> list[tuple[str, str]]:
    """Side and size phrases that pick `target` out of `group` (all objects sharing what `nouns` say)."""
    pair = len(group) == 2
    out: list[tuple[str, str]] = []
    margin = SIDE_MARGIN * width
    for side, sign in (("left", -1.0), ("right", 1.0)):
        if _extreme(group, target, lambda o: sign * o.cx, margin):
            for k, noun in enumerate(nouns):
                if pair:
                    out.append((f"the {noun} on the {side}", "left/right"))
                    if k == 0:  # "the left circle", "the left red shape" (not "the left red one")
                        out.append((f"the {side} {noun}", "left/right"))
                else:
                    out += [(f"the {side}most {noun}", "left/right"), (f"the {noun} on the far {side}", "left/right")]
    for sign, pair_forms, group_forms in ((1, ("bigger", "larger"), ("biggest", "largest")),
                                          (-1, ("smaller",), ("smallest",))):
        if _extreme(group, target, lambda o: sign * o.size, 1):
            for noun in nouns:
                out += [(f"the {form} {noun}", "bigger/smaller") for form in (pair_forms if pair else group_forms)]
    return out


def candidate_phrases(objects: list[SceneObject], target: SceneObject, width: int) -> list[tuple[str, str]]:
    """Every template phrase that names `target` and no other object of the scene, with its type.

    A relational phrase is only made inside a group that needs it (two circles, two red objects,
    all objects), so its type says what the phrase really tests.
    """
    same_shape = [o for o in objects if o.shape == target.shape]
    same_colour = [o for o in objects if o.colour == target.colour]
    c, s = target.colour, target.shape
    out = [(f"the {c} {s}", "colour+shape"), (f"{c} {s}", "colour+shape"), (f"the {s} that is {c}", "colour+shape")]
    if len(same_shape) == 1:
        out += [(f"the {s}", "shape"), (f"the only {s}", "shape")]
    else:
        out += _relational(same_shape, target, [s], width)
    if len(same_colour) == 1:
        out += [(f"the {c} one", "colour"), (f"the {c} shape", "colour"), (f"the {c} object", "colour")]
    else:
        out += _relational(same_colour, target, [f"{c} shape", f"{c} one"], width)
    out += _relational(objects, target, ["object", "shape"], width)
    return out


def describe(objects: list[SceneObject], width: int, rng: np.random.Generator) -> None:
    """Give each object PHRASES_PER_OBJECT distinct phrases: each time a type drawn by PHRASE_TYPE_WEIGHTS
    (among the types with phrases left for it), then one of that type's phrases at random."""
    for target in objects:
        by_type: dict[str, list[str]] = {}
        for text, kind in candidate_phrases(objects, target, width):
            by_type.setdefault(kind, []).append(text)
        chosen: list[tuple[str, str]] = []
        while len(chosen) < PHRASES_PER_OBJECT and by_type:
            kinds = [k for k in PHRASE_TYPES if k in by_type]
            weights = np.array([PHRASE_TYPE_WEIGHTS[k] for k in kinds])
            kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
            text = by_type[kind].pop(int(rng.integers(len(by_type[kind]))))
            if not by_type[kind]:
                del by_type[kind]
            chosen.append((text, kind))
        target.phrases = chosen


def phrase_type(text: str) -> str:
    """The type of a phrase ("colour+shape", "shape", "colour", "left/right", "bigger/smaller"), or "other".

    Side and size words win over attribute words, as in the generator: "the red one on the left" is
    a side phrase because the side is what singles the object out.
    """
    words = set(re.findall(r"[a-z]+", text.lower()))
    if words & _SIDE_WORDS:
        return "left/right"
    if words & _SIZE_WORDS:
        return "bigger/smaller"
    has_colour, has_shape = bool(words & set(COLOURS)), bool(words & set(SHAPES))
    if has_colour and has_shape:
        return "colour+shape"
    if has_shape:
        return "shape"
    if has_colour:
        return "colour"
    return "other"


# ---------------------------------------------------------------- pixels


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule), the rule pycocotools nearly follows. (H, W) bool"""
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1] + 0.5  # (h, w) pixel centres
    inside = np.zeros(xs.shape, dtype=bool)
    ax, ay = polygon[:, 0], polygon[:, 1]
    bx, by = np.roll(ax, -1), np.roll(ay, -1)
    for xa, ya, xb, yb in zip(ax, ay, bx, by):
        if ya == yb:
            continue
        crosses = (ya > ys) != (yb > ys)
        x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xs < x_at)
    mask[y0:y1 + 1, x0:x1 + 1] = inside
    return mask


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour: low saturation, middle value, so no background patch looks like a shape colour."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    return np.array(rgb) * 255


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Gradient or smooth noise, plus maybe stripes and blurred blotches. (H, W, 3) float"""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)  # (H, W)
    if rng.uniform() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        low, high = _muted(rng).astype(np.float32), _muted(rng).astype(np.float32)
        image = low + (high - low) * t[..., None]
    else:
        cells = rng.integers(3, 9)
        grid = np.stack([_muted(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3).astype(np.uint8)
        image = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
    if rng.uniform() < 0.5:
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.03, 0.12)
        wave = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
        image = image + wave[..., None] * (rng.uniform(6, 18) * rng.choice([-1, 1], size=3)).astype(np.float32)
    if rng.uniform() < 0.5:
        layer = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(3, 9))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(0.05, 0.2) * width, rng.uniform(0.05, 0.2) * height
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in _muted(rng)))
        image = np.asarray(layer.filter(ImageFilter.GaussianBlur(rng.uniform(4, 10))), dtype=np.float32)
    return image


def render_scene(rng: np.random.Generator, objects: list[SceneObject], width: int, height: int,
                 plain: bool = False) -> np.ndarray:
    """The RGB picture: background, then each polygon filled with its colour, then sensor-like noise. (H, W, 3) uint8

    `plain` paints on mid grey without noise, so a test can find each object by its colour.
    """
    image = np.full((height, width, 3), 128, dtype=np.float32) if plain else _background(rng, width, height)
    for obj in objects:
        tint = np.array(COLOURS[obj.colour]) + (0 if plain else rng.integers(-12, 13, size=3))
        image[polygon_mask(obj.polygon, height, width)] = tint
    if not plain:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 9))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the refer layout


def _split_of_images(image_ids: list[int], seed: int) -> dict[int, str]:
    """70/10/10/10 by image (as refer's unc splits), each split non-empty once there are 4 images."""
    order = np.random.default_rng([seed, 0]).permutation(len(image_ids))
    total = len(image_ids)
    counts = [max(1, int(total * share)) if total >= len(SPLITS) else 0 for _, share in SPLITS[1:]]
    bounds = np.cumsum([total - sum(counts)] + counts)
    names = [name for name, _ in SPLITS]
    return {image_ids[int(i)]: names[int(np.searchsorted(bounds, rank, side="right"))] for rank, i in enumerate(order)}


def _sentence(sent_id: int, text: str) -> dict:
    sent = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    return {"sent_id": sent_id, "raw": text, "sent": " ".join(sent.split()), "tokens": sent.split()}


def generate_refer_dataset(out: str | Path, *, images: int = 1200, seed: int = 0, name: str = "synthref",
                           width: int = 320, height: int = 240, progress: bool = True) -> Path:
    """Write `out/<name>/instances.json`, `out/<name>/refs(unc).p` and `out/images/*.jpg`; return `out`.

    Build it with `sgdata build refcoco --refer-root OUT --images OUT/images --dataset <name> --split-by unc`.
    """
    if images < 1:
        raise UserError(f"--images must be at least 1 (got {images}).")
    if seed < 0:
        raise UserError(f"--seed must be zero or positive (got {seed}).")
    if width < 96 or height < 72:
        raise UserError(f"synthetic images must be at least 96x72 pixels (got {width}x{height}).")
    if not re.fullmatch(r"[A-Za-z0-9_+-]+", name):
        raise UserError(f"the dataset name {name!r} may only hold letters, digits, '_', '+' and '-'.")
    from tqdm import tqdm

    out = Path(out)
    images_dir, data_dir = out / "images", out / name
    images_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    image_ids = list(range(1, images + 1))
    split_of = _split_of_images(image_ids, seed)
    coco_images, annotations, refs = [], [], []
    wanted = set()
    ann_id = sent_id = 0
    for image_id in tqdm(image_ids, desc="synth images", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, image_id])
        objects = make_scene(rng, width, height)
        pixels = render_scene(rng, objects, width, height)
        file_name = f"{name}_{image_id:06d}.jpg"
        wanted.add(file_name)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        write_bytes_atomic(images_dir / file_name, buffer.getvalue())
        coco_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            ann_id += 1
            x0, y0, x1, y1 = obj.bbox()
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
                "segmentation": [[float(v) for v in obj.polygon.reshape(-1)]],
                "area": int(polygon_mask(obj.polygon, height, width).sum()),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "iscrowd": 0,
                "attributes": {"colour": obj.colour, "size": SIZES[obj.size]},
            })
            sentences = []
            for text, _ in obj.phrases:
                sent_id += 1
                sentences.append(_sentence(sent_id, text))
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split_of[image_id],
                         "category_id": SHAPES.index(obj.shape) + 1, "file_name": f"{name}_{image_id:06d}_{ann_id}.jpg",
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
    for stale in images_dir.glob(f"{name}_*.jpg"):  # left by an earlier, larger run
        if stale.name not in wanted and re.fullmatch(rf"{re.escape(name)}_\d{{6}}\.jpg", stale.name):
            stale.unlink()
    instances = {
        "info": {"description": f"sgdata synthetic referring set, seed {seed}", "seed": seed,
                 "width": width, "height": height},
        "images": coco_images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)],
    }
    write_bytes_atomic(data_dir / "refs(unc).p", pickle.dumps(refs, protocol=2))
    write_bytes_atomic(data_dir / "instances.json", json.dumps(instances, separators=(",", ":")).encode("utf-8"))
    return out

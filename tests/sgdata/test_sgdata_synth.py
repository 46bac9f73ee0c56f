"""Synthetic referring set: refer layout, deterministic, masks that match the pixels, phrases that pick one object."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sgdata.format.errors import UserError
from sgdata.synth import (COLOURS, PHRASE_TYPES, SHAPES, SIZES, generate_refer_dataset, make_scene, phrase_type,
                          render_scene)

IMAGES, SEED, W, H = 20, 7, 320, 240


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_refer_dataset(tmp_path_factory.mktemp("synth"), images=IMAGES, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def layout(synth: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((synth / "synthref" / "instances.json").read_text())
    with open(synth / "synthref" / "refs(unc).p", "rb") as handle:
        refs = pickle.load(handle)  # plain pickle, as the refer toolkit reads it
    return instances, refs


def test_refer_layout_and_splits(synth: Path, layout) -> None:
    instances, refs = layout
    assert {c["name"] for c in instances["categories"]} == set(SHAPES)
    assert len(instances["images"]) == IMAGES
    for image in instances["images"]:
        assert Image.open(synth / "images" / image["file_name"]).size == (image["width"], image["height"]) == (W, H)
    anns = {a["id"]: a for a in instances["annotations"]}
    for ann in anns.values():
        assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
    per_image = Counter(a["image_id"] for a in anns.values())
    assert set(per_image.values()) <= {3, 4}
    splits_by_image: dict[int, set[str]] = {}
    for ref in refs:
        assert set(ref) == {"ref_id", "ann_id", "image_id", "split", "category_id", "file_name", "sent_ids",
                            "sentences"}
        ann = anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        assert not (synth / "images" / ref["file_name"]).exists()  # refer-style name, not a file
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]] and len(ref["sentences"]) >= 2
        for sentence in ref["sentences"]:
            assert sentence["tokens"] == sentence["sent"].split() and sentence["raw"]
        splits_by_image.setdefault(ref["image_id"], set()).add(ref["split"])
    assert all(len(s) == 1 for s in splits_by_image.values())  # split by image, as refer's unc
    counts = Counter(next(iter(s)) for s in splits_by_image.values())
    assert counts == {"train": 14, "val": 2, "testA": 2, "testB": 2}
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)


def test_same_seed_same_bytes_other_seed_other_data(synth: Path, tmp_path: Path) -> None:
    again = generate_refer_dataset(tmp_path / "again", images=IMAGES, seed=SEED, progress=False)
    assert _digest(again) == _digest(synth)
    other = generate_refer_dataset(tmp_path / "other", images=IMAGES, seed=SEED + 1, progress=False)
    assert (other / "synthref" / "instances.json").read_bytes() != (synth / "synthref" / "instances.json").read_bytes()
    first = (other / "images" / "synthref_000001.jpg").read_bytes()
    assert first != (synth / "images" / "synthref_000001.jpg").read_bytes()


def test_fewer_images_reuses_the_same_scenes_and_removes_stale_files(synth: Path, tmp_path: Path) -> None:
    out = generate_refer_dataset(tmp_path / "small", images=6, seed=SEED, progress=False)
    name = "images/synthref_000003.jpg"
    assert (out / name).read_bytes() == (synth / name).read_bytes()
    generate_refer_dataset(out, images=4, seed=SEED, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"synthref_{i:06d}.jpg" for i in range(1, 5)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _coco_mask(polygon: list[float]) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], H, W))).astype(bool)


def test_stored_polygons_are_the_painted_pixels(layout) -> None:
    instances, _ = layout
    anns_by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in (1, 2, 3, 4, 5):
        objects = make_scene(np.random.default_rng([SEED, image_id]), W, H)
        anns = anns_by_image[image_id]
        assert [a["segmentation"][0] for a in anns] == [o.polygon.reshape(-1).tolist() for o in objects]
        plain = render_scene(np.random.default_rng(0), objects, W, H, plain=True)  # (H, W, 3) grey + shapes
        for obj, ann in zip(objects, anns):
            colour_mask = np.all(plain == np.array(COLOURS[obj.colour]), axis=-1)
            x, y, w, h = ann["bbox"]
            window = np.zeros_like(colour_mask)
            window[max(int(y) - 2, 0):int(y + h) + 3, max(int(x) - 2, 0):int(x + w) + 3] = True
            drawn = colour_mask & window  # same-colour objects are >= 6 px apart
            coco = _coco_mask(ann["segmentation"][0])
            assert _iou(drawn, coco) > 0.95, (image_id, obj.shape)
            assert abs(int(drawn.sum()) - ann["area"]) <= 0.02 * ann["area"] + 2


def test_jpeg_pixels_show_each_object_in_its_colour(synth: Path, layout) -> None:
    instances, _ = layout
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    for ann in instances["annotations"][:30]:
        pixels = np.asarray(Image.open(synth / "images" / files[ann["image_id"]]).convert("RGB"), dtype=float)
        inside = _coco_mask(ann["segmentation"][0])
        core = inside & np.roll(inside, 3, 0) & np.roll(inside, -3, 0) & np.roll(inside, 3, 1) & np.roll(inside, -3, 1)
        mean = pixels[core].mean(axis=0)
        assert np.abs(mean - COLOURS[ann["attributes"]["colour"]]).max() < 25
    share = [a["area"] / (W * H) for a in instances["annotations"]]
    assert 0.015 < min(share) and max(share) < 0.08


# ---------------------------------------------------------------- phrases


def _resolve(text: str, objects: list[dict]) -> list[dict]:
    """An independent reader of the phrase templates: which objects could `text` mean? (ambiguity -> several)"""
    words = re.findall(r"[a-z]+", text)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    group = [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]
    side = next((w for w in words if w.startswith(("left", "right"))), None)
    size = next((w for w in words if w in {"bigger", "larger", "biggest", "largest", "smaller", "smallest"}), None)
    if side is None and size is None:
        return group
    if len(group) < 2 or ("most" in text or "far" in text or "est" in (size or "")) != (len(group) > 2):
        return group  # comparatives need a pair, superlatives a larger group
    if side:
        key, margin = (lambda o: -o["cx"] if side.startswith("left") else o["cx"]), 15.0
    else:
        key, margin = (lambda o: o["area"] if size.startswith(("big", "larg")) else -o["area"]), 0.0
        ranked = sorted(group, key=key, reverse=True)
        ratio = max(ranked[0]["area"], ranked[1]["area"]) / min(ranked[0]["area"], ranked[1]["area"])
        return ranked[:1] if ratio > 1.3 else ranked
    ranked = sorted(group, key=key, reverse=True)
    return ranked[:1] if key(ranked[0]) - key(ranked[1]) >= margin else ranked


def test_every_phrase_singles_out_its_own_object(layout) -> None:
    instances, refs = layout
    shapes = {c["id"]: c["name"] for c in instances["categories"]}
    objects_by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        objects_by_image.setdefault(ann["image_id"], []).append(
            {"id": ann["id"], "shape": shapes[ann["category_id"]], "colour": ann["attributes"]["colour"],
             "cx": x + w / 2, "area": ann["area"]})
    types = Counter()
    for ref in refs:
        for sentence in ref["sentences"]:
            matches = _resolve(sentence["sent"], objects_by_image[ref["image_id"]])
            assert [m["id"] for m in matches] == [ref["ann_id"]], sentence["sent"]
            types[phrase_type(sentence["sent"])] += 1
    assert set(types) == set(PHRASE_TYPES)  # every type occurs in 20 images


def test_phrase_type_matches_the_generator_and_distractors_share_attributes() -> None:
    shared = 0
    for image_id in range(1, 41):
        objects = make_scene(np.random.default_rng([3, image_id]), W, H)
        shapes, colours = Counter(o.shape for o in objects), Counter(o.colour for o in objects)
        shared += max(shapes.values()) > 1 or max(colours.values()) > 1
        assert len({(o.shape, o.colour) for o in objects}) == len(objects)
        for obj in objects:
            assert len(obj.phrases) == len({text for text, _ in obj.phrases}) >= 2
            for text, kind in obj.phrases:
                assert phrase_type(text) == kind, text
    assert shared >= 30  # most scenes hold a distractor that shares a shape or a colour
    assert phrase_type("the large red shape") == "bigger/smaller" and phrase_type("a cat") == "other"
    assert {SIZES[o.size] for o in make_scene(np.random.default_rng(1), W, H)} <= set(SIZES)


def test_bad_arguments_are_one_sentence_errors(tmp_path: Path) -> None:
    for kwargs in ({"images": 0}, {"seed": -1}, {"width": 10}, {"name": "a/b"}):
        with pytest.raises(UserError):
            generate_refer_dataset(tmp_path, progress=False, **kwargs)


def test_builds_through_the_refcoco_path_with_masks_equal_to_the_polygons(synth: Path, layout, tmp_path: Path) -> None:
    """The demo's path: synth -> `sgdata build refcoco` -> every sentence and mask of the shards as generated."""
    import tarfile

    from sgdata.api import build_refcoco

    instances, refs = layout
    anns = {a["id"]: a for a in instances["annotations"]}
    sentences = {r["ann_id"]: [s["sent"] for s in r["sentences"]] for r in refs}
    out = tmp_path / "shards"
    build_refcoco(synth, synth / "images", "synthref", "unc", out, workers=0)
    assert not (out / "failures.jsonl").read_text().strip()
    seen = 0
    for tar in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if not member.name.endswith(".json"):
                    continue
                for ref in json.loads(archive.extractfile(member).read())["refs"]:
                    assert [s["text"] for s in ref["sentences"]] == sentences[ref["ann_id"]]
                    mask = mask_utils.decode(ref["mask"]).astype(bool)
                    assert (mask == _coco_mask(anns[ref["ann_id"]]["segmentation"][0])).all()
                    seen += 1
    assert seen == len(refs)

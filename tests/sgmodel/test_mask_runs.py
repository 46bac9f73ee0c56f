"""Masks as runs: the vectorised RLE reader agrees with pycocotools, and run-space scoring agrees with a
per-pixel computation (upsample, min-max threshold, IoU counts, argmax) on many maps and mask sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


from sgdata.format import SegmentationError, decode_counts, mask_to_rle
from sgmodel import mask_runs
from sgmodel.inference import sample_positions, upsample_group, upsampling_axis
from sgmodel.mask_runs import MaskRuns, as_runs_list, runs_from_dense, runs_from_rles, score_maps
from tests.helpers.oracles import decode_counts_string, dense_from_runs, per_pixel_scores

MASK_SIZES = [(427, 640), (375, 500), (1, 7), (7, 1), (33, 17), (1, 1), (10, 9)]


def random_mask(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """Masks with the structures RLE meets: blobs, speckle, full, empty, touching the borders."""
    if kind == "empty":
        return np.zeros((height, width), dtype=bool)
    if kind == "full":
        return np.ones((height, width), dtype=bool)
    if kind == "border":  # a frame along all four edges
        mask = np.zeros((height, width), dtype=bool)
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
        return mask
    if kind == "speckle":
        return rng.random((height, width)) < 0.3
    mask = np.zeros((height, width), dtype=bool)  # a few boxes, some cut off by the image edge
    for _ in range(3):
        y, x = rng.integers(-height // 4, height), rng.integers(-width // 4, width)
        mask[max(y, 0) : y + rng.integers(1, height + 1), max(x, 0) : x + rng.integers(1, width + 1)] = True
    return mask ^ (rng.random((height, width)) < 0.02)


def runs_from_rle(rle: dict) -> MaskRuns:
    return runs_from_rles([rle])[0]


def score_runs(grid: np.ndarray, runs: MaskRuns, threshold: float = 0.5) -> tuple[int, int, bool]:
    """(intersection, union, hit) of one grid (h, w) against one mask, through score_maps."""
    intersection, union, hit = score_maps(np.asarray(grid)[None], [runs], threshold)
    return int(intersection[0]), int(union[0]), bool(hit[0])


def pycocotools_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground runs of what pycocotools decodes from the mask's compressed RLE, read off the pixels."""
    rle = mask_to_rle(mask)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})  # (H, W) uint8
    flat = np.concatenate([[0], decoded.T.reshape(-1), [0]]).astype(np.int8)  # column-major, padded
    changes = np.flatnonzero(np.diff(flat))
    return changes[0::2], changes[1::2]


# ---- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", MASK_SIZES)
def test_decoded_runs_equal_what_pycocotools_decodes(size):
    rng = np.random.default_rng(sum(size))
    for kind in ("blobs", "speckle", "empty", "full", "border", "blobs"):
        mask = random_mask(rng, *size, kind)
        rle = mask_to_rle(mask)
        runs = runs_from_rle(rle)
        starts, ends = pycocotools_runs(mask)
        assert np.array_equal(runs.starts, starts) and np.array_equal(runs.ends, ends), kind
        assert runs.shape == size and runs.area == mask.sum()
        assert decode_counts(rle["counts"]).tolist() == decode_counts_string(rle["counts"])  # run lengths too


def test_many_strings_decode_together_as_one_by_one():
    rng = np.random.default_rng(3)
    masks = [random_mask(rng, *size, kind) for size in MASK_SIZES for kind in ("blobs", "empty", "full", "speckle")]
    rles = [mask_to_rle(m) for m in masks]
    together = runs_from_rles(rles)
    for mask, rle, runs in zip(masks, rles, together):
        alone = runs_from_rle(rle)
        assert np.array_equal(runs.starts, alone.starts) and np.array_equal(runs.ends, alone.ends)
        assert np.array_equal(dense_from_runs(runs.starts, runs.ends, *runs.shape), mask)  # and back to pixels


def test_dense_masks_give_the_same_runs_even_with_255_for_true():
    rng = np.random.default_rng(4)
    mask = random_mask(rng, 33, 17, "blobs")
    raw = torch.from_numpy(mask.astype(np.uint8) * 255)
    from_rle = runs_from_rle(mask_to_rle(mask))
    for dense in (mask, torch.from_numpy(mask), raw.view(torch.bool), raw.numpy().view(bool), mask.astype(np.uint8)):
        runs = runs_from_dense(dense)
        assert np.array_equal(runs.starts, from_rle.starts) and np.array_equal(runs.ends, from_rle.ends)


def test_uncompressed_counts_and_repeated_masks():
    mask = random_mask(np.random.default_rng(5), 20, 30, "blobs")
    rle = mask_to_rle(mask)
    lengths = decode_counts(rle["counts"]).tolist()
    runs = as_runs_list([rle, {"size": [20, 30], "counts": lengths}, rle, torch.from_numpy(mask)])
    assert runs[0] is runs[2]  # a mask shared by several sentences is decoded once
    for other in runs[1:]:
        assert np.array_equal(other.starts, runs[0].starts) and np.array_equal(other.ends, runs[0].ends)


@pytest.mark.parametrize("counts, message", [
    ("0 1", "not a run-length character"),  # a space
    ("1k", "middle of a run"),  # the last character says more groups follow
    ("52", "sum to"),  # 5 + 2 != 4 * 4
    ("0@", "negative"),  # "@" is 16: the sign bit alone, so the second run is -32
])
def test_malformed_counts_are_refused(counts, message):
    with pytest.raises(SegmentationError, match=message):
        runs_from_rle({"size": [4, 4], "counts": counts})


# ---- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size, in_size", [(640, 24), (427, 24), (24, 24), (7, 24), (1, 12), (33, 16)])
def test_the_sample_positions_are_bilinear_resizing(out_size, in_size):
    """Both forms of the rule sample where F.interpolate(bilinear, align_corners=False) does."""
    grid = torch.rand(1, in_size, 5, dtype=torch.float64)
    expected = F.interpolate(grid[None], size=(out_size, 5), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(upsample_group(grid, (out_size, 5)).double(), expected, atol=1e-5)
    low, high, frac = sample_positions(out_size, in_size)
    lines = grid[0].numpy().T  # (5, in) five lines to sample
    assert np.allclose(lines[:, low] + frac * (lines[:, high] - lines[:, low]), expected[0].numpy().T, atol=1e-9)
    axis = upsampling_axis(out_size, in_size)
    assert np.array_equal(axis.low, low) and np.array_equal(axis.frac, frac)


# ---- scoring against a per-pixel reference --------------------------------------------------------


def random_grid(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    if kind == "noise":
        return rng.random(shape).astype(np.float32)
    ys, xs = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    cy, cx = rng.uniform(-1, 1, 2)
    blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / rng.uniform(0.05, 0.5))  # a smooth peak, like a slot map
    return (blob + 0.1 * rng.random(shape)).astype(np.float32)


@pytest.mark.parametrize("grid_shape", [(24, 24), (12, 16)])
def test_scores_equal_the_per_pixel_definition(grid_shape):
    rng = np.random.default_rng(grid_shape[1])
    sizes = MASK_SIZES + [grid_shape, (2 * grid_shape[0] + 1, grid_shape[1] // 2)]  # + the grid's own size, mixed scaling
    grids, masks, expected = [], [], []
    for size in sizes:
        for kind, mask_kind in (("noise", "blobs"), ("smooth", "blobs"), ("smooth", "speckle"), ("noise", "border")):
            grid, mask = random_grid(rng, grid_shape, kind), random_mask(rng, *size, mask_kind)
            grids.append(grid)
            masks.append(mask)
            expected.append(per_pixel_scores(grid, mask))
    intersection, union, hit = score_maps(np.stack(grids), as_runs_list([mask_to_rle(m) for m in masks]))
    for i, (inter, uni, peak_hit) in enumerate(expected):
        assert abs(intersection[i] - inter) <= 2 and abs(union[i] - uni) <= 2, (i, masks[i].shape)
        assert hit[i] == peak_hit, (i, masks[i].shape)
    assert sum(e[0] for e in expected) > 0 and sum(e[2] for e in expected) > 0  # the cases do overlap and hit
    assert not hit.all()


def test_other_thresholds_and_hand_counted_case():
    grid = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)  # 2x2 -> 4x4: a ramp towards the top right
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 2:] = True
    for threshold in (0.2, 0.5, 0.8):
        assert score_runs(grid, runs_from_dense(mask), threshold) == per_pixel_scores(grid, mask, threshold)
    # response = top-row weight (1, .75, .25, 0 by row) x right-column weight (0, .25, .75, 1 by column):
    # above 0.5 at (0,2) .75, (0,3) 1, (1,2) .5625, (1,3) .75; the peak (0,3) is in the mask
    assert score_runs(grid, runs_from_dense(mask)) == (2, 4, True)


def test_flat_maps_predict_nothing_and_point_at_the_first_pixel():
    rng = np.random.default_rng(7)
    for value in (0.0, 0.4, -3.0, 1e-8):
        for size in ((5, 9), (427, 640)):
            mask = random_mask(rng, *size, "blobs")
            mask[0, 0] = value > 0  # the first pixel decides the hit
            inter, union, hit = score_runs(np.full((24, 24), value, dtype=np.float32), runs_from_dense(mask))
            assert (inter, union, hit) == (0, int(mask.sum()), bool(mask[0, 0]))


def test_empty_masks_count_the_prediction_as_the_union():
    rng = np.random.default_rng(8)
    grid = random_grid(rng, (24, 24), "smooth")
    empty = np.zeros((375, 500), dtype=bool)
    inter, union, hit = score_runs(grid, runs_from_rle(mask_to_rle(empty)))
    assert inter == 0 and not hit
    assert abs(union - per_pixel_scores(grid, empty)[1]) <= 2 and union > 0


def test_batches_score_as_phrases_one_by_one_in_any_chunking(monkeypatch):
    rng = np.random.default_rng(9)
    sizes = [(40, 30), (7, 1), (40, 30), (33, 17), (40, 30), (24, 24)]
    grids = np.stack([random_grid(rng, (24, 24), "noise" if i % 2 else "smooth") for i in range(len(sizes))])
    runs = [runs_from_dense(random_mask(rng, *size, "blobs")) for size in sizes]
    one_by_one = [score_runs(g, r) for g, r in zip(grids, runs)]
    monkeypatch.setattr(mask_runs, "CHUNK_KNOTS", 1)  # one phrase per chunk
    small = score_maps(grids, runs)
    monkeypatch.setattr(mask_runs, "CHUNK_KNOTS", 1 << 24)  # every phrase of a size in one chunk
    large = score_maps(grids, runs)
    for scored in (small, large):
        assert [(int(i), int(u), bool(h)) for i, u, h in zip(*scored)] == one_by_one


def test_maps_and_masks_must_pair():
    with pytest.raises(ValueError, match="do not pair"):
        score_maps(np.zeros((2, 3, 3)), [MaskRuns(np.zeros(0, np.int64), np.zeros(0, np.int64), 4, 4)])

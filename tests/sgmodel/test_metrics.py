"""The batched metrics agree with a straightforward per-sample numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgmodel.metrics import PRECISION_THRESHOLDS, MetricAccumulator
from tests.helpers.oracles import per_pixel_scores


def reference_metrics(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """One phrase at a time, pixel by pixel (tests/helpers/oracles.py): upsample, min-max, threshold 0.5, IoU, argmax."""
    scores = [per_pixel_scores(grid, gt) for grid, gt in zip(maps, masks)]
    inters, unions, hits = (np.array(column) for column in zip(*scores))
    ious = np.where(unions > 0, inters / np.maximum(unions, 1), 0.0)
    out = {"mIoU": ious.mean(), "cIoU": inters.sum() / unions.sum(), "PointM": np.mean(hits)}
    for t in PRECISION_THRESHOLDS:
        out[f"Prec@{t}"] = np.mean(ious > t)
    return out


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    sizes = [(17, 23), (8, 8), (17, 23), (31, 12), (8, 8), (17, 23), (5, 40)]
    maps, masks = [], []
    for i, (height, width) in enumerate(sizes):
        gt = np.zeros((height, width), dtype=bool)
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        gt[y0 : y0 + rng.integers(1, height - y0 + 1), x0 : x0 + rng.integers(1, width - x0 + 1)] = True
        gt ^= rng.random((height, width)) < 0.1  # ragged borders
        masks.append(gt)
        # a coarse view of the mask plus noise of growing strength: IoUs from high to chance
        rows = ((np.arange(6) + 0.5) * height / 6).astype(int)
        cols = ((np.arange(7) + 0.5) * width / 7).astype(int)
        maps.append(gt[np.ix_(rows, cols)].astype(float) + rng.random((6, 7)) * 0.3 * i)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_metrics_match_the_per_sample_reference(seed):
    maps, masks = random_case(seed)
    acc = MetricAccumulator()
    torch_maps = torch.tensor(np.stack(maps), dtype=torch.float32)
    torch_masks = [torch.from_numpy(m) for m in masks]
    acc.update(torch_maps[:3], torch_masks[:3], texts=[f"p{i}" for i in range(3)])  # several batches
    acc.update(torch_maps[3:], torch_masks[3:], texts=[f"p{i}" for i in range(3, len(masks))])
    got = acc.compute()
    expected = reference_metrics(maps, masks)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-3), name
        assert 0.0 <= got[name] <= 1.0
    per_phrase = acc.per_phrase_lines()
    assert [p["sentence"] for p in per_phrase] == [f"p{i}" for i in range(len(masks))]
    assert len(acc) == len(masks)


def test_perfect_and_flat_maps():
    gt = torch.zeros(6, 6, dtype=torch.bool)
    gt[1:4, 2:5] = True
    acc = MetricAccumulator()
    acc.update(gt.float()[None], [gt])  # the mask itself as the response map
    assert acc.compute()["mIoU"] == 1.0 and acc.compute()["PointM"] == 1.0
    flat = MetricAccumulator()
    flat.update(torch.full((1, 3, 3), 0.4), [gt])  # flat response: empty prediction, no NaN
    result = flat.compute()
    assert result["mIoU"] == 0.0 and result["cIoU"] == 0.0
    assert MetricAccumulator().compute()["mIoU"] == 0.0


def test_states_merge_across_ranks():
    maps, masks = random_case(5)
    torch_maps = torch.tensor(np.stack(maps), dtype=torch.float32)
    torch_masks = [torch.from_numpy(m) for m in masks]
    whole = MetricAccumulator()
    whole.update(torch_maps, torch_masks)
    rank0, rank1 = MetricAccumulator(), MetricAccumulator()
    rank0.update(torch_maps[:4], torch_masks[:4])
    rank1.update(torch_maps[4:], torch_masks[4:])
    rank0.merge(rank1.state())
    assert rank0.compute() == pytest.approx(whole.compute())


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        MetricAccumulator().update(torch.rand(2, 3, 3), [torch.zeros(4, 4, dtype=torch.bool)])


def test_masks_whose_true_bytes_are_not_one_score_the_same():
    """A bool mask can hold 255 for True (e.g. viewed from a PIL mode-"1" buffer); counts must not see 255."""
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = 1.0
    raw = torch.zeros(4, 4, dtype=torch.uint8)
    raw[:2, :3] = 255
    acc_raw, acc_plain = MetricAccumulator(), MetricAccumulator()
    acc_raw.update(maps, [raw.view(torch.bool)])
    acc_plain.update(maps, [raw > 0])
    assert acc_raw.compute() == acc_plain.compute()
    assert abs(acc_plain.compute()["mIoU"] - 4 / 6) < 1e-9


def test_masks_as_the_loader_hands_them_over_score_as_dense_masks():
    """The eval loader passes the shards' RLE dicts; decoded runs and dense masks are accepted too, and all
    give the same numbers as the per-sample reference."""
    from sgdata.format import mask_to_rle
    from sgmodel.mask_runs import runs_from_dense

    maps, masks = random_case(4)
    torch_maps = torch.tensor(np.stack(maps), dtype=torch.float32)
    rles = [mask_to_rle(m) for m in masks]
    forms = {
        "dense": [torch.from_numpy(m) for m in masks],
        "rle": rles,
        "runs": [runs_from_dense(m) for m in masks],
        "mixed": [rles[0], torch.from_numpy(masks[1]), runs_from_dense(masks[2])] + rles[3:],
    }
    expected = reference_metrics(maps, masks)
    results = {}
    for name, gt in forms.items():
        acc = MetricAccumulator()
        acc.update(torch_maps, gt)
        results[name] = acc.state()
        for metric, value in expected.items():
            assert acc.compute()[metric] == pytest.approx(value, abs=1e-3), (name, metric)
    assert results["rle"] == results["dense"] == results["runs"] == results["mixed"]


def test_one_rle_shared_by_several_phrases_scores_each_against_its_own_map():
    from sgdata.format import mask_to_rle

    gt = np.zeros((30, 40), dtype=bool)
    gt[5:20, 10:30] = True
    rle = mask_to_rle(gt)
    good = torch.zeros(1, 6, 8)
    good[0, 1:4, 2:6] = 1.0  # the mask's own box on the grid
    bad = torch.zeros(1, 6, 8)
    bad[0, 5, 0] = 1.0  # a corner outside the mask
    acc = MetricAccumulator()
    acc.update(torch.cat([good, bad]), [rle, rle])
    assert acc.ious[0] > 0.7 and acc.ious[1] == 0.0
    assert acc.hits == [True, False]

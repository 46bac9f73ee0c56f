"""benchmarks/quality.py: each baseline scores what it claims to, on hand-made maps (no model, no data)."""

from __future__ import annotations

import torch

from benchmarks import quality
from sgmodel.metrics import MetricAccumulator


def box_mask(size, top, left, height, width):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


def test_candidate_scores_match_the_metric_on_random_maps():
    torch.manual_seed(0)
    maps = torch.rand(5, 6, 8)  # (M, h, w) on a token grid
    gts = torch.rand(3, 30, 40) > 0.7  # (t, H, W)
    inter, union, iou, hit = quality.candidate_scores(maps, gts)
    for m in range(5):
        acc = MetricAccumulator()
        acc.update(maps[m].expand(3, -1, -1), list(gts))
        assert inter[:, m].tolist() == acc.intersections
        assert union[:, m].tolist() == acc.unions
        assert torch.allclose(iou[:, m], torch.tensor(acc.ious, dtype=torch.double))
        assert hit[:, m].tolist() == acc.hits
    # the last column is the whole image: I = |gt|, U = area
    assert inter[:, -1].tolist() == gts.flatten(1).sum(1).tolist()
    assert union[:, -1].tolist() == [30 * 40] * 3
    assert not hit[:, -1].any()


def test_centre_prior_keeps_the_central_box_of_half_each_side():
    grid, size = (12, 16), (120, 160)
    acc = MetricAccumulator()
    centre = box_mask(size, 30, 40, 60, 80)  # the middle half of each side
    corner = box_mask(size, 0, 0, 20, 20)
    acc.update(quality.centre_prior_map(grid).expand(2, -1, -1), [centre, corner])
    assert acc.ious[0] > 0.9 and acc.hits[0]
    assert acc.ious[1] == 0.0 and not acc.hits[1]


def hand_made_output():
    """One image, K = 3 slots on a 4x4 grid: slot 0 = left half, slot 1 = right half, slot 2 = nothing."""
    slot_maps = torch.zeros(1, 3, 4, 4)
    slot_maps[0, 0, :, :2] = 1.0
    slot_maps[0, 1, :, 2:] = 1.0
    slot_maps[0, 2] = 0.0
    slot_maps = slot_maps * 0.98 + 0.01  # soft partition: every token's weights sum to 1 over the slots
    slot_maps[0, 2] = 1.0 - slot_maps[0, 0] - slot_maps[0, 1]
    weights = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])  # phrase 2 weights the wrong slot
    index = torch.zeros(3, dtype=torch.long)
    maps = (weights[:, :, None, None] * slot_maps[index]).sum(1)
    left, right = box_mask((4, 4), 0, 0, 4, 2), box_mask((4, 4), 0, 2, 4, 2)
    masks = [left, right, right]
    texts = ["the red circle", "the rightmost object", "the blue square"]
    return {"maps": maps, "slot_maps": slot_maps, "weights": weights}, index, masks, texts


def test_top1_follows_the_weights_and_the_oracle_follows_the_truth():
    out, index, masks, texts = hand_made_output()
    states = quality.candidate_states(out, index, masks, texts)
    assert states["top-1 slot"]["ious"] == [1.0, 1.0, 0.0]  # phrase 2 points at the left slot
    assert states["best-slot oracle"]["ious"] == [1.0, 1.0, 1.0]
    assert states["whole image"]["ious"] == [0.5, 0.5, 0.5]
    assert states["uniform slot weights"]["ious"] == [0.0, 0.0, 0.0]  # a flat map gives an empty mask
    assert states["top-1 slot"]["texts"] == texts


def test_summary_splits_by_phrase_type_and_drops_pointm_of_flat_methods():
    out, index, masks, texts = hand_made_output()
    accs = {name: MetricAccumulator() for name in quality.METHODS}
    accs["model"].update(out["maps"], masks, texts)
    for name, state in quality.candidate_states(out, index, masks, texts).items():
        accs[name].merge(state)
    summary = {name: quality.summarise(acc, point=name not in quality.NO_POINT) for name, acc in accs.items()}
    assert summary["model"]["by_type"]["colour+shape"]["count"] == 2
    assert summary["model"]["by_type"]["left/right"] == {"mIoU": 1.0, "PointM": 1.0, "count": 1}
    assert summary["whole image"]["PointM"] is None and summary["uniform slot weights"]["PointM"] is None
    assert abs(summary["top-1 slot"]["mIoU"] - 2 / 3) < 1e-9
    record = {"count": 3, "shards": "x", "split": "val", "step": 7, "methods": summary}
    table = quality.markdown_table(record)
    assert "| best-slot oracle | 100.0 |" in table and "left/right (1)" in table
    assert quality.curve_point(record)["model"]["mIoU"] == summary["model"]["mIoU"]

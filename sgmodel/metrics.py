"""Referring-segmentation metrics at the original mask resolution (DESIGN §2).

Per phrase: the response map is upsampled to its ground-truth mask's size, min-max normalised and
thresholded (inference.py), and compared with the mask. Over a split:
  mIoU     mean of per-phrase IoU
  cIoU     Σ intersection / Σ union (a.k.a. overall IoU)
  PointM   share of phrases whose upsampled response-map argmax lies inside the mask
  Prec@X   share of phrases with IoU > X, X in 0.5 … 0.9
An IoU whose union is empty (empty mask and empty prediction) counts as 0.

Phrases whose masks share a size are scored as one tensor (upsample, threshold, IoU, argmax), so the
Python loop runs over distinct sizes, not over phrases.
"""

from __future__ import annotations

import torch

from sgmodel.inference import group_by_size, threshold_maps, upsample_group

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class MetricAccumulator:
    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.ious: list[float] = []
        self.hits: list[bool] = []
        self.texts: list[str | None] = []

    def __len__(self) -> int:
        return len(self.ious)

    @torch.no_grad()
    def update(self, maps: torch.Tensor, gt_masks: list[torch.Tensor], texts: list[str] | None = None) -> None:
        """maps (T, h, w) response maps (any resolution); gt_masks: T bool tensors (H_t, W_t)."""
        if len(gt_masks) != maps.shape[0]:
            raise ValueError(f"{maps.shape[0]} response maps but {len(gt_masks)} ground-truth masks")
        count = len(gt_masks)
        inter = torch.zeros(count, dtype=torch.long)
        union = torch.zeros(count, dtype=torch.long)
        hits = torch.zeros(count, dtype=torch.bool)
        for size, idx in group_by_size([tuple(m.shape[-2:]) for m in gt_masks]).items():
            response = upsample_group(maps[idx], size)  # (G, H, W)
            # uint8 views: CPU kernels for stacking and summing bytes are several times faster than for bool
            pred = threshold_maps(response, self.threshold).flatten(1).view(torch.uint8)  # (G, H*W)
            gt = torch.stack([gt_masks[i].ne(0).view(torch.uint8) for i in idx]).to(response.device).flatten(1)  # ne(0): 0/1 bytes
            index = torch.as_tensor(idx)
            both = (pred & gt).sum(dim=1, dtype=torch.int64)  # (G,)
            inter[index] = both.cpu()
            union[index] = (pred.sum(dim=1, dtype=torch.int64) + gt.sum(dim=1, dtype=torch.int64) - both).cpu()
            peak = response.flatten(1).argmax(dim=1, keepdim=True)  # (G, 1)
            hits[index] = gt.gather(1, peak).squeeze(1).bool().cpu()
        iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros(count, dtype=torch.double))
        self.intersections += inter.tolist()
        self.unions += union.tolist()
        self.ious += iou.tolist()
        self.hits += hits.tolist()
        self.texts += list(texts) if texts is not None else [None] * count

    def compute(self) -> dict[str, float]:
        """Fractions in [0, 1]; all zeros before any update."""
        if not self.ious:
            return {"mIoU": 0.0, "cIoU": 0.0, "PointM": 0.0, **{f"Prec@{x}": 0.0 for x in PRECISION_THRESHOLDS}}
        iou = torch.tensor(self.ious, dtype=torch.double)
        total_union = sum(self.unions)
        out = {
            "mIoU": iou.mean().item(),
            "cIoU": sum(self.intersections) / total_union if total_union else 0.0,
            "PointM": sum(self.hits) / len(self.hits),
        }
        for x in PRECISION_THRESHOLDS:
            out[f"Prec@{x}"] = (iou > x).double().mean().item()
        return out

    @property
    def per_phrase(self) -> list[dict]:
        """One record per phrase, in update order: for breakdowns by phrase type."""
        return [
            {"iou": iou, "hit": hit, "text": text, "intersection": i, "union": u}
            for iou, hit, text, i, u in zip(self.ious, self.hits, self.texts, self.intersections, self.unions)
        ]

    def state(self) -> dict:
        """Plain lists (picklable), e.g. for all_gather_object across evaluation ranks."""
        return {
            "intersections": self.intersections,
            "unions": self.unions,
            "ious": self.ious,
            "hits": self.hits,
            "texts": self.texts,
        }

    def merge(self, state: dict) -> None:
        """Add another accumulator's state() (another rank's phrases)."""
        for name, values in state.items():
            getattr(self, name).extend(values)

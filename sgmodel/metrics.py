"""Referring-segmentation metrics at the original mask resolution (docs/method.md).

Per phrase: the response map is upsampled to its ground-truth mask's size, min-max normalised and
thresholded (inference.py), and compared with the mask. Over a split:
  mIoU     mean of per-phrase IoU
  cIoU     Σ intersection / Σ union (a.k.a. overall IoU)
  PointM   share of phrases whose upsampled response-map argmax lies inside the mask
  Prec@X   share of phrases with IoU > X, X in 0.5 … 0.9
An IoU whose union is empty (empty mask and empty prediction) counts as 0.

The counts are exact but never built pixel by pixel: the masks stay run-length encoded as the shards
store them, and the upsampled, thresholded map is computed as on/off edges per pixel column
(sgmodel/mask_runs.py says how), so a phrase costs about h x W work instead of H x W. The one
difference from a per-pixel computation is float rounding at the threshold: a pixel whose response
equals min + 0.5 (max - min) to within float precision may be counted on either side (a per-pixel
implementation is itself subject to its own float order there); all other pixels count exactly.
Phrases whose masks share a size are scored as one array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sgmodel.mask_runs import as_runs_list, score_maps

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class MetricAccumulator:
    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.ious: list[float] = []
        self.hits: list[bool] = []
        self.texts: list[str | None] = []
        self.keys: list[str | None] = []
        self.ref_ids: list[Any] = []

    def __len__(self) -> int:
        return len(self.ious)

    @torch.no_grad()
    def update(self, maps: torch.Tensor, gt_masks: list[Any], texts: list[str] | None = None,
               keys: list[str] | None = None, ref_ids: list[Any] | None = None) -> None:
        """maps (T, h, w) response maps (any resolution); gt_masks: T masks (H_t, W_t), each an RLE dict
        as the shards store it ({"size": [H, W], "counts": str}), a sgmodel.mask_runs.MaskRuns, or a
        dense bool tensor/array."""
        if len(gt_masks) != maps.shape[0]:
            raise ValueError(f"{maps.shape[0]} response maps but {len(gt_masks)} ground-truth masks")
        count = len(gt_masks)
        grids = maps.detach().float().cpu().numpy()  # (T, h, w)
        inter, union, hits = score_maps(grids, as_runs_list(list(gt_masks)), self.threshold)  # (T,) each
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)  # (T,)
        self.intersections += inter.tolist()
        self.unions += union.tolist()
        self.ious += iou.tolist()
        self.hits += hits.tolist()
        self.texts += list(texts) if texts is not None else [None] * count
        self.keys += list(keys) if keys is not None else [None] * count  # the sample of each phrase
        self.ref_ids += list(ref_ids) if ref_ids is not None else [None] * count

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

    def per_phrase_lines(self) -> list[dict]:
        """One JSON-ready record per phrase, for error analysis (`sgmodel evaluate --per-phrase`):
        key, ref_id (None where the shards store none), sentence, iou, point_hit, and the pixel counts
        that make cIoU. `from_lines` turns any subset back into metrics."""
        return [
            {"key": key, "ref_id": ref, "sentence": text, "iou": iou, "point_hit": bool(hit), "intersection": i, "union": u}
            for key, ref, text, iou, hit, i, u in zip(self.keys, self.ref_ids, self.texts, self.ious, self.hits,
                                                      self.intersections, self.unions)
        ]

    @classmethod
    def from_lines(cls, lines: list[dict]) -> "MetricAccumulator":
        """An accumulator holding these per-phrase records (`per_phrase_lines`), e.g. one phrase type's."""
        acc = cls()
        acc.merge({"intersections": [int(r["intersection"]) for r in lines], "unions": [int(r["union"]) for r in lines],
                   "ious": [float(r["iou"]) for r in lines], "hits": [bool(r["point_hit"]) for r in lines],
                   "texts": [r.get("sentence") for r in lines], "keys": [r.get("key") for r in lines],
                   "ref_ids": [r.get("ref_id") for r in lines]})
        return acc

    def state(self) -> dict:
        """Plain lists (picklable), e.g. for all_gather_object across evaluation ranks."""
        return {
            "intersections": self.intersections,
            "unions": self.unions,
            "ious": self.ious,
            "hits": self.hits,
            "texts": self.texts,
            "keys": self.keys,
            "ref_ids": self.ref_ids,
        }

    def merge(self, state: dict) -> None:
        """Add another accumulator's state() (another rank's phrases); lists it lacks are filled with None."""
        count = len(state["ious"])
        for name in ("intersections", "unions", "ious", "hits", "texts", "keys", "ref_ids"):
            getattr(self, name).extend(state.get(name, [None] * count))

"""Evaluate a checkpoint on referring shards: mIoU, cIoU, PointM, Prec@0.5..0.9 at the original mask resolution.

    python -m sgmodel.evaluate --checkpoint RUN/checkpoint.pt --shards SHARDS --out metrics.json [--save-overlays N]

The model is rebuilt from the checkpoint's own config (frozen encoders run live; their standardisation
statistics come from the checkpoint), runs in eval mode with deterministic slot sampling, and every
phrase of every sample is scored once. Masks are never used to pick a checkpoint here: this reports a
given checkpoint, it does not select one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sgdata.format import UserError, atomic_write, expand_shards, rle_to_mask, write_json_atomic
from sgdata.format.drawing import caption_tile, color_for, make_grid, overlay_mask
from sgmodel.checkpoint import model_from_checkpoint
from sgmodel.eval_data import check_eval_shards, eval_loader
from sgmodel.logs import configure_logging

logger = logging.getLogger("sgmodel.evaluate")  # not __name__: that is "__main__" under python -m


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but this machine has no CUDA GPU")
    return torch.device(name)


def overlay_figure(image: Image.Image, predicted: np.ndarray, text: str, truth: np.ndarray | None = None, tile_width: int = 256) -> Image.Image:
    """image | predicted mask overlay | ground-truth overlay (when given), the phrase under each panel."""
    panels = [caption_tile(image, [text], width=tile_width), caption_tile(overlay_mask(image, predicted, color_for(0)), [("predicted", color_for(0))], width=tile_width)]
    if truth is not None:
        panels.append(caption_tile(overlay_mask(image, truth, color_for(2)), [("ground truth", color_for(2))], width=tile_width))
    return make_grid(panels, cols=len(panels))


@torch.no_grad()
def evaluate(checkpoint: str, shards: str, batch_size: int = 8, workers: int = 0, device: str = "auto",
             overlays: int = 0, overlay_dir: Path | None = None, per_phrase: Path | None = None) -> dict[str, Any]:
    """Score every phrase of `shards`; return the metrics.json record (and write up to `overlays` PNGs,
    and one JSON line per phrase to `per_phrase`: key, ref_id, sentence, iou, point_hit)."""
    from sgmodel.encoders import build_tokenizer
    from sgmodel.inference import predict_masks
    from sgmodel.metrics import MetricAccumulator

    urls = expand_shards(shards)
    split = check_eval_shards(urls)
    dev = pick_device(device)
    model, cfg, state = model_from_checkpoint(checkpoint, dev)
    torch.manual_seed(cfg.slots.eval_seed)
    loader = eval_loader(urls, cfg, build_tokenizer(cfg.text), batch_size, workers, keep_originals=overlays > 0)
    metrics = MetricAccumulator()
    saved = 0
    for batch in tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True):
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        maps = model.infer(inputs)["maps"].float().cpu()  # (T, h, w)
        keys = [batch["keys"][i] for i in batch["text_image_index"].tolist()]
        metrics.update(maps, batch["masks"], batch["texts"], keys, batch.get("ref_ids"))
        if saved < overlays:
            index = batch["text_image_index"].tolist()
            # the first phrase of each image before any second one: a grid of overlays shows many scenes
            order = sorted(range(len(index)), key=lambda t: (t - index.index(index[t]), t))
            chosen = order[: overlays - saved]
            sizes = [tuple(batch["masks"][t]["size"]) for t in chosen]  # masks come as RLE dicts
            for t, predicted in zip(chosen, predict_masks(maps[chosen], sizes)):
                truth = rle_to_mask(batch["masks"][t])  # (H, W) bool: only the few overlay masks are decoded
                figure = overlay_figure(Image.fromarray(batch["originals"][index[t]].numpy()), predicted.numpy(), batch["texts"][t], truth)
                overlay_dir.mkdir(parents=True, exist_ok=True)
                figure.save(overlay_dir / f"overlay-{saved:04d}.png")
                saved += 1
    if len(metrics) == 0:
        raise UserError(f"the shards {shards!r} hold no phrase with a mask to evaluate")
    if per_phrase is not None:
        with atomic_write(per_phrase, "w") as f:
            for line in metrics.per_phrase_lines():
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {"metrics": metrics.compute(), "count": len(metrics), "split": split, "checkpoint": str(checkpoint),
            "step": state["step"], "shards": shards}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgmodel.evaluate", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt (or its run folder)")
    parser.add_argument("--shards", required=True, help="referring shards with masks: directory | glob | brace pattern | comma list")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--save-overlays", type=int, default=0, metavar="N", help="write N overlay PNGs (image | prediction | ground truth)")
    parser.add_argument("--overlay-dir", help="where the overlays go (default: beside --out, in <out stem>_overlays/)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--workers", type=int, default=0, help="dataloader worker processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--per-phrase", metavar="FILE.jsonl", help="also write one line per phrase: key, ref_id, sentence, iou, point_hit")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    try:
        if args.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        overlay_dir = Path(args.overlay_dir) if args.overlay_dir else out.with_name(f"{out.stem}_overlays")
        record = evaluate(args.checkpoint, args.shards, args.batch_size, args.workers, args.device, args.save_overlays, overlay_dir,
                          Path(args.per_phrase) if args.per_phrase else None)
    except UserError as exc:
        logger.error(f"error: {exc}")
        return 2
    write_json_atomic(out, record)
    summary = "  ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
    logger.info(f"{record['count']} phrases ({record['split'] or 'unnamed split'}): {summary} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

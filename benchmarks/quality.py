"""The quality benchmark: how well a trained checkpoint segments from phrases, against what simple
priors and the model's own slots would give (docs/results.md).

    python -m benchmarks.quality --checkpoint RUN/checkpoint.pt --shards HELDOUT/val --out RUN/quality.json
    python -m benchmarks.quality --watch RUN --until-step 1200 --shards HELDOUT/val --out RUN/curve.jsonl

Every method is scored by the same code (sgmodel.metrics.MetricAccumulator: upsample to the mask's
size, min-max normalise, threshold 0.5, IoU; PointM from the response map's argmax) on the same
phrases, from the same forward pass of the model:

  model                 M = sum_k w_k A_k, the method's output
  whole image           the mask is the whole image (PointM undefined: a flat map has no peak)
  centre prior          a map peaking at the image centre; its 0.5 level set is the central box
                        covering half the width and half the height
  uniform slot weights  M = mean_k A_k. The entity maps A sum to 1 over slots at every token, so this
                        map is flat and its mask empty: what the gather weights are worth
  top-1 slot            M = A_k for the slot the phrase weights most
  best-slot oracle      per phrase, the single slot whose mask has the highest IoU with the truth: the
                        ceiling a one-slot answer could reach (it looks at the masks, so it is a
                        diagnostic, never a result)

and all of them per phrase type (sgdata.synth.phrase_type: colour+shape, shape, colour, left/right,
bigger/smaller). Run it on a split of a synthetic set made with a seed the model never trained on.
The checkpoint is whatever it is given (the last step of a run): masks never choose one here.

--watch follows a training run: each time RUN/checkpoint.pt is rewritten it scores it and appends one
line (step, every method's metrics) to --out, for training curves; it stops after --until-step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/quality.py` as well as `python -m benchmarks.quality`
    sys.path.insert(0, str(ROOT))

from sgdata.format import UserError  # noqa: E402
from sgdata.synth import PHRASE_TYPES, phrase_type  # noqa: E402
from sgmodel.mask_runs import as_runs_list, score_maps  # noqa: E402
from sgmodel.metrics import MetricAccumulator  # noqa: E402

BASELINES = ("whole image", "centre prior", "uniform slot weights", "top-1 slot", "best-slot oracle")
METHODS = ("model", *BASELINES)
NO_POINT = {"whole image", "uniform slot weights"}  # flat maps have no peak: PointM is reported as None
FLAT_DECIMALS = 5  # the uniform map is flat up to float rounding; rounding keeps that noise from becoming a mask


# ---- what each method answers with ---------------------------------------------------------------


def centre_prior_map(grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) pyramid peaking at the centre: 1 - max(|dy|/H, |dx|/W). Min-max normalised and cut at 0.5
    it keeps |dy| < H/4 and |dx| < W/4, the central box of half the width and height."""
    h, w = grid
    ys = ((torch.arange(h) + 0.5) / h - 0.5).abs()  # (h,) distance from the centre, in image heights
    xs = ((torch.arange(w) + 0.5) / w - 0.5).abs()  # (w,)
    return 1.0 - torch.maximum(ys[:, None], xs[None, :])  # (h, w)


def image_candidates(slot_maps: torch.Tensor) -> torch.Tensor:
    """One image's answers that do not depend on the phrase: (K + 2, h, w) = its K slot maps, the
    centre prior, and the uniform slot average (flat up to rounding, which is cut off)."""
    uniform = slot_maps.mean(dim=0, keepdim=True).round(decimals=FLAT_DECIMALS)  # (1, h, w)
    return torch.cat([slot_maps, centre_prior_map(tuple(slot_maps.shape[-2:]))[None], uniform])


def candidate_scores(candidates: torch.Tensor, gt_masks, threshold: float = 0.5):
    """Score M response maps of one image against the t masks of its phrases, with the metric's own code.

    candidates (M, h, w); gt_masks: the t masks (RLE dicts as the eval loader hands them over, or dense
    (H, W)) -> intersection, union, iou, hit, each (t, M + 1): every (mask, map) pair goes through
    sgmodel.mask_runs.score_maps, as MetricAccumulator does. The last column is the whole-image mask
    (I = |mask|, U = H * W; hit False: it has no peak).
    """
    runs = as_runs_list(list(gt_masks))  # t masks, decoded once
    t, m = len(runs), candidates.shape[0]
    grids = candidates.detach().float().cpu().numpy()  # (M, h, w)
    pairs = np.broadcast_to(grids, (t, *grids.shape)).reshape(t * m, *grids.shape[1:])  # (t*M, h, w)
    inter, union, hit = score_maps(pairs, [r for r in runs for _ in range(m)], threshold)  # (t*M,) each
    areas = np.array([r.area for r in runs])  # (t,)
    pixels = np.array([r.shape[0] * r.shape[1] for r in runs])  # (t,)
    inter = torch.from_numpy(np.column_stack([inter.reshape(t, m), areas]))  # (t, M+1)
    union = torch.from_numpy(np.column_stack([union.reshape(t, m), pixels]))  # (t, M+1)
    hit = torch.from_numpy(np.column_stack([hit.reshape(t, m), np.zeros(t, dtype=bool)]))  # (t, M+1)
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros_like(inter, dtype=torch.double))
    return inter.long(), union.long(), iou, hit


def candidate_states(out: dict[str, torch.Tensor], index: torch.Tensor, gt_masks: list,
                     texts: list[str]) -> dict[str, dict[str, list]]:
    """MetricAccumulator states of every method except the model's own map, for one batch.

    gt_masks: as the eval loader hands them over (RLE dicts) or dense bool (H, W).
    """
    slot_maps, weights = out["slot_maps"], out["weights"]  # (B, K, h, w), (T, K)
    k = slot_maps.shape[1]
    columns = {"whole image": k + 2, "centre prior": k, "uniform slot weights": k + 1}
    states = {name: {"intersections": [], "unions": [], "ious": [], "hits": [], "texts": []} for name in BASELINES}
    for image in index.unique().tolist():
        rows = (index == image).nonzero().flatten()
        gt = [gt_masks[r] for r in rows.tolist()]  # t masks of one image
        inter, union, iou, hit = candidate_scores(image_candidates(slot_maps[image]), gt)
        picks = {name: torch.full((len(rows),), col) for name, col in columns.items()}
        picks["top-1 slot"] = weights[rows].argmax(dim=1)  # the slot the phrase weights most
        picks["best-slot oracle"] = iou[:, :k].argmax(dim=1)  # the slot closest to the truth
        for name, col in picks.items():
            j = torch.arange(len(rows))
            state = states[name]
            state["intersections"] += inter[j, col].tolist()
            state["unions"] += union[j, col].tolist()
            state["ious"] += iou[j, col].tolist()
            state["hits"] += hit[j, col].tolist()
            state["texts"] += [texts[r] for r in rows.tolist()]
    return states


# ---- scoring a checkpoint -----------------------------------------------------------------------


def by_phrase_type(lines: list[dict]) -> dict[str, list[dict]]:
    """Per-phrase records (`sgmodel evaluate --per-phrase` lines) grouped by sgdata.synth.phrase_type."""
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(phrase_type(line["sentence"] or ""), []).append(line)
    order = [k for k in PHRASE_TYPES if k in groups] + sorted(set(groups) - set(PHRASE_TYPES))
    return {kind: groups[kind] for kind in order}


def summarise(acc: MetricAccumulator, point: bool = True) -> dict[str, Any]:
    """The split metrics plus the same per phrase type (mIoU, PointM, count), from the per-phrase records."""
    record: dict[str, Any] = dict(acc.compute())
    record["count"] = len(acc)
    record["by_type"] = {}
    for kind, lines in by_phrase_type(acc.per_phrase_lines()).items():
        metrics = MetricAccumulator.from_lines(lines).compute()
        record["by_type"][kind] = {"mIoU": metrics["mIoU"], "PointM": metrics["PointM"] if point else None,
                                   "count": len(lines)}
    if not point:
        record["PointM"] = None
    return record


@torch.no_grad()
def score_model(model: torch.nn.Module, loader, device: torch.device) -> dict[str, Any]:
    """Run every method over `loader` (an sgmodel.eval_data.eval_loader) with an already loaded model."""
    accs = {name: MetricAccumulator() for name in METHODS}
    for batch in loader:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = {k: v.float().cpu() for k, v in model.infer(inputs).items()}
        keys = [batch["keys"][i] for i in batch["text_image_index"].tolist()]
        accs["model"].update(out["maps"], batch["masks"], batch["texts"], keys, batch.get("ref_ids"))
        for name, state in candidate_states(out, batch["text_image_index"], batch["masks"], batch["texts"]).items():
            accs[name].merge(state)
    if len(accs["model"]) == 0:
        raise UserError("the shards hold no phrase with a mask to score")
    return {name: summarise(acc, point=name not in NO_POINT) for name, acc in accs.items()}


def evaluate_quality(checkpoint: str | Path, shards: str, batch_size: int = 16, device: str = "cpu",
                     refine_iterations: int | None = None) -> dict[str, Any]:
    """Score a checkpoint on referring shards; the record quality.json holds.

    refine_iterations: score with this many refinement iterations instead of the checkpoint's own
    (0 = the paper's rule), for the on/off comparison of docs/results.md.
    """
    from sgmodel.checkpoint import model_from_checkpoint
    from sgdata.format import expand_shards
    from sgmodel.eval_data import check_eval_shards, eval_loader
    from sgmodel.encoders import build_tokenizer
    from sgmodel.evaluate import pick_device

    urls = expand_shards(shards)
    split = check_eval_shards(urls)
    dev = pick_device(device)
    started = time.time()
    model, cfg, state = model_from_checkpoint(checkpoint, dev)
    if refine_iterations is not None:
        model.cfg = cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, refine_iterations=refine_iterations))
    torch.manual_seed(cfg.eval_seed)
    loader = eval_loader(urls, cfg, build_tokenizer(cfg.text), batch_size)
    methods = score_model(model, loader, dev)
    return {"checkpoint": str(checkpoint), "step": int(state["step"]), "shards": shards, "split": split,
            "refine_iterations": cfg.inference.refine_iterations,
            "count": methods["model"]["count"], "seconds": round(time.time() - started, 1), "methods": methods}


# ---- reporting ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(record: dict[str, Any]) -> str:
    """Two markdown tables: split metrics per method, and mIoU / PointM per phrase type (in %)."""
    methods = record["methods"]
    lines = [f"{record['count']} phrases of {record['shards']} (split {record['split'] or '?'}), checkpoint step {record['step']}; values in %.",
             "", "| method | mIoU | cIoU | PointM | Prec@0.5 |", "|---|---:|---:|---:|---:|"]
    for name, m in methods.items():
        lines.append(f"| {name} | {_pct(m['mIoU'])} | {_pct(m['cIoU'])} | {_pct(m['PointM'])} | {_pct(m['Prec@0.5'])} |")
    kinds = list(methods["model"]["by_type"])
    counts = methods["model"]["by_type"]
    lines += ["", "mIoU / PointM per phrase type:", "",
              "| method | " + " | ".join(f"{k} ({counts[k]['count']})" for k in kinds) + " |",
              "|---|" + "---:|" * len(kinds)]
    for name, m in methods.items():
        cells = [f"{_pct(m['by_type'][k]['mIoU'])} / {_pct(m['by_type'][k]['PointM'])}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_point(record: dict[str, Any]) -> dict[str, Any]:
    """One line of a --watch curve: the step and the headline numbers of each method."""
    point: dict[str, Any] = {"step": record["step"]}
    for name, m in record["methods"].items():
        point[name] = {"mIoU": m["mIoU"], "PointM": m["PointM"], "cIoU": m["cIoU"],
                       "by_type": {k: v["mIoU"] for k, v in m["by_type"].items()}}
    return point


def watch(run: Path, shards: str, out: Path, until_step: int, batch_size: int, device: str, poll: float = 5.0) -> None:
    """Score each new version of RUN/checkpoint.pt until one reaches `until_step`; append to `out` (jsonl)."""
    from sgmodel.checkpoint import CHECKPOINT_NAME

    path = run / CHECKPOINT_NAME
    seen = None
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is None or stamp == seen:
            time.sleep(poll)
            continue
        seen = stamp
        try:
            record = evaluate_quality(path, shards, batch_size, device)
        except UserError as exc:  # replaced while being read: score the next version
            print(f"skipped a checkpoint version: {exc}", file=sys.stderr)
            continue
        with open(out, "a") as f:
            f.write(json.dumps(curve_point(record)) + "\n")
        m = record["methods"]
        print(f"step {record['step']}: mIoU {m['model']['mIoU']:.3f} PointM {m['model']['PointM']:.3f} "
              f"oracle {m['best-slot oracle']['mIoU']:.3f}", file=sys.stderr, flush=True)
        if record["step"] >= until_step:
            return


# ---- figures for docs/results.md -----------------------------------------------------------------


def plot_curves(run: Path, png: Path, title: str = "") -> None:
    """Training losses (RUN/log.jsonl) and, when RUN/curve.jsonl exists (`--watch`), held-out mIoU,
    PointM and oracle mIoU vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    curve_file = run / "curve.jsonl"
    curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()] if curve_file.exists() else []
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 6.5, 3.8), squeeze=False)
    left = axes[0][0]
    steps = [r["step"] for r in log]
    for key, label in (("contrastive", "contrastive"), ("reconstruction", "reconstruction"),
                       ("coreference", "co-reference"), ("accuracy", "contrastive accuracy (train)")):
        if any(r.get(key) is not None for r in log):
            left.plot(steps, [r.get(key) for r in log], label=label)
    left.set_xlabel("step")
    left.set_title("training losses")
    left.legend(fontsize=8)
    if curve:
        right = axes[0][1]
        steps = [p["step"] for p in curve]
        for name, key, style in (("model", "mIoU", "-o"), ("model", "PointM", "--o"), ("best-slot oracle", "mIoU", ":o"),
                                 ("top-1 slot", "mIoU", "-."), ("centre prior", "mIoU", "-"), ("whole image", "mIoU", "-")):
            right.plot(steps, [p[name][key] for p in curve], style, label=f"{name} {key}", markersize=3)
        right.set_ylim(0, 1)
        right.set_xlabel("step")
        right.set_title("held-out val (a seed never trained on)")
        right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_sweep(runs: list[Path], png: Path) -> None:
    """Held-out model mIoU (solid) and PointM (dashed) vs step of several runs' curve.jsonl, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for i, run in enumerate(runs):
        curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines() if line.strip()]
        steps = [p["step"] for p in curve]
        colour = plt.cm.tab20(i % 20)
        left.plot(steps, [p["model"]["mIoU"] for p in curve], "-o", color=colour, markersize=3, label=run.name)
        right.plot(steps, [p["model"]["PointM"] for p in curve], "--o", color=colour, markersize=3, label=run.name)
    for axis, name, floor in ((left, "mIoU", 0.40), (right, "PointM", 0.70)):
        axis.axhline(floor, color="grey", linewidth=0.8)
        axis.set_title(f"held-out val {name} (grey: the floor)")
        axis.set_xlabel("step")
        axis.set_ylim(0, 1 if name == "PointM" else 0.6)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def overlay_grid(overlay_dir: Path, png: Path, count: int = 8) -> None:
    """The first `count` overlay PNGs of sgmodel.evaluate --save-overlays stacked into one image."""
    from PIL import Image

    from sgdata.format import make_grid

    tiles = [Image.open(p).convert("RGB") for p in sorted(overlay_dir.glob("*.png"))[:count]]
    if not tiles:
        raise UserError(f"no overlay PNGs in {overlay_dir}")
    png.parent.mkdir(parents=True, exist_ok=True)
    make_grid(tiles, cols=2).save(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0], allow_abbrev=False)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", help="checkpoint.pt (or its run folder) to score")
    mode.add_argument("--watch", metavar="RUN", help="follow RUN/checkpoint.pt while it trains (curve mode)")
    mode.add_argument("--curves", metavar="RUN", help="plot RUN/log.jsonl + RUN/curve.jsonl into the PNG --out")
    mode.add_argument("--overlay-grid", metavar="DIR", help="stack DIR's overlay PNGs into the PNG --out")
    mode.add_argument("--sweep", metavar="RUN", nargs="+", help="plot several runs' curve.jsonl into the PNG --out")
    parser.add_argument("--until-step", type=int, default=0, help="with --watch: stop after scoring this step")
    parser.add_argument("--shards", help="referring shards with masks, of a seed never trained on")
    parser.add_argument("--out", required=True, help="quality.json; with --watch a .jsonl curve to append to; a PNG for figures")
    parser.add_argument("--markdown", help="markdown table to write (default: --out with .md)")
    parser.add_argument("--title", default="", help="figure title (--curves)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--refine-iterations", type=int, help="score with this refinement instead of the checkpoint's (0 = none)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.curves:
            plot_curves(Path(args.curves), out, args.title)
            return 0
        if args.overlay_grid:
            overlay_grid(Path(args.overlay_grid), out)
            return 0
        if args.sweep:
            plot_sweep([Path(r) for r in args.sweep], out)
            return 0
        if not args.shards:
            raise UserError("--shards is needed to score a checkpoint")
        if args.watch:
            watch(Path(args.watch), args.shards, out, args.until_step, args.batch_size, args.device)
            return 0
        record = evaluate_quality(args.checkpoint, args.shards, args.batch_size, args.device, args.refine_iterations)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    table = markdown_table(record)
    Path(args.markdown or out.with_suffix(".md")).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

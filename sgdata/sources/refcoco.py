"""The RefCOCO family in the refer toolkit layout: `ROOT/<dataset>/instances.json` + `refs(<splitBy>).p`.

`plan_refcoco` reads the two files (the pickle without running code, see `sgdata.refer`) and hands
the refs to `refer_plan.plan_refs`, which checks every ref and groups them into one sample per
image; `refer_sample.finalize` writes each sample in the workers. Problems with the whole input
(missing root, unknown splitBy, unreadable files) are UserErrors.
"""

from __future__ import annotations

from pathlib import Path

from sgdata.format.errors import UserError
from sgdata.refer import load_instances, load_refs
from sgdata.sources.base import Option, SourcePlan
from sgdata.sources.refer_plan import plan_refs
from sgdata.sources.refer_sample import finalize

KNOWN_SPLIT_BY = {"refcoco": ["unc"], "refcoco+": ["unc"], "refcocog": ["umd", "google"]}


def _check_layout(refer_root: Path, images_dir: Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    if not refer_root.is_dir():
        raise UserError(f"refer root {refer_root} does not exist or is not a folder.")
    dataset_dir = refer_root / dataset
    if not dataset_dir.is_dir():
        present = sorted(p.name for p in refer_root.iterdir() if (p / "instances.json").is_file())
        raise UserError(f"dataset folder {dataset_dir} does not exist (datasets under the root: {', '.join(present) or 'none'}).")
    known = KNOWN_SPLIT_BY.get(dataset)
    if known is not None and split_by not in known:
        raise UserError(f"{dataset} has no splitBy '{split_by}'; use {' or '.join(known)}.")
    refs_path = dataset_dir / f"refs({split_by}).p"
    if not refs_path.is_file():
        present = sorted(p.name for p in dataset_dir.glob("refs(*).p"))
        raise UserError(f"refs file {refs_path} does not exist (refs files there: {', '.join(present) or 'none'}).")
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist or is not a folder.")
    return dataset_dir / "instances.json", refs_path


def plan_refcoco(
    refer_root: str | Path,
    images_dir: str | Path,
    dataset: str,
    split_by: str,
    splits: list[str] | None = None,
) -> SourcePlan:
    """Read and check one refer dataset; one SampleSpec per (split, image), sorted by key."""
    refer_root, images_dir = Path(refer_root), Path(images_dir)
    instances_path, refs_path = _check_layout(refer_root, images_dir, dataset, split_by)
    instances = load_instances(instances_path)
    refs = load_refs(refs_path)
    card = {"source": "refcoco", "refer_root": str(refer_root), "images_dir": str(images_dir),
            "instances_file": str(instances_path), "refs_file": str(refs_path)}
    return plan_refs(refs, instances, images_dir, dataset, split_by, splits, refs_label=str(refs_path),
                     refs_name=refs_path.name, instances_name="instances.json", card=card)


class ReferSource:
    """`sgdata build refcoco --refer-root ...`: the refer toolkit's own files."""

    name = "refcoco"
    command = "refcoco"
    help = ("Shards of a RefCOCO-family dataset, from the refer toolkit files (--refer-root) or the Hub parquet "
            "copies (--hub-parquet): one sample per image with every ref, sentence and mask.")
    options = (
        Option("refer_root", "refer toolkit data root (ROOT/<dataset>/instances.json, refs(<splitBy>).p).",
               "path", required=True),
        Option("images", "Folder of the COCO train2014 images.", "path", required=True),
        Option("dataset", "refcoco, refcoco+ or refcocog.", required=True),
        Option("split_by", "unc, umd or google (implied for the Hub copies).", required=True),
        Option("splits", "Comma-separated splits (default: all), e.g. val,testA.", "splits"),
    )
    layout = ("refer_root",)

    def plan(self, *, refer_root, images, dataset, split_by, splits=None) -> SourcePlan:
        return plan_refcoco(refer_root, images, dataset, split_by, splits)

    finalize = staticmethod(finalize)


SOURCE = ReferSource()

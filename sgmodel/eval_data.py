"""The evaluation stream: every sample of referring shards once, each phrase with its ground-truth mask.

Apart from the training stream (sgmodel/data.py) because it differs in every respect that matters:
no shuffling, no epochs, no phrase sampling, partial last batch, and the masks ride along as the
stored RLE (never decoded for the metrics). Batches are `sgmodel.batch.Batch` records with
`masks`, `ref_ids` and, for overlays, `originals`.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from sgdata.format import UserError, decode_rgb
from sgdata.format.storage import open_shard
from sgmodel.data import batched, image_to_tensor, tar_samples


def eval_phrase_refs(sample_json: dict) -> list[tuple[str, dict, Any]]:
    """(phrase, mask RLE, ref_id) of a referring sample: one per sentence (ref_id None when not stored)."""
    return [
        (s["text"].strip(), ref["mask"], ref.get("ref_id"))
        for ref in sample_json.get("refs", [])
        if ref.get("mask")
        for s in ref.get("sentences", [])
        if isinstance(s.get("text"), str) and s["text"].strip()
    ]


def _first_json(url: str) -> dict | None:
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    return json.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise UserError(f"shard {url} cannot be read ({exc})") from None
    return None


def check_eval_shards(urls: list[str]) -> str:
    """Refuse shards whose samples carry no masks (caption shards); return the split name they record."""
    split = ""
    for url in urls:
        meta = _first_json(url)
        if meta is None:
            continue
        if not any(ref.get("mask") for ref in meta.get("refs", [])):
            raise UserError(f"shard {url} holds no referring masks (caption shards cannot be evaluated); evaluate on shards from `sgdata build refcoco` or `sgdata build phrasecut`")
        split = split or str(meta.get("split", ""))
    return split


class EvalStream(IterableDataset):
    """Every sample once, in shard order: image, its phrases, one ground-truth mask per phrase."""

    def __init__(self, urls: list[str], image_size: tuple[int, int], batch_size: int, tokenizer: Any, max_length: int, keep_originals: bool = False):
        super().__init__()
        self.urls = urls
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keep_originals = keep_originals

    def _item(self, sample: dict) -> dict | None:
        meta = json.loads(sample["json"])
        phrases = eval_phrase_refs(meta)
        if not phrases:
            warnings.warn(f"sample {sample['__key__']} in {sample['__url__']} has no phrase with a mask; not evaluated")
            return None
        image = decode_rgb(sample["jpg"])
        item = {
            "key": sample["__key__"],
            "texts": [text for text, _, _ in phrases],
            "ref_ids": [ref_id for _, _, ref_id in phrases],  # the stored ref of each phrase (per-phrase results)
            "image": image_to_tensor(image, self.image_size),  # (3, H, W)
            "masks": [rle for _, rle, _ in phrases],  # list of compressed RLE dicts (H_t, W_t), as stored: scored without decoding
        }
        if self.keep_originals:
            item["original"] = torch.from_numpy(np.array(image))  # (H, W, 3) uint8, for overlays
        return item

    def __iter__(self) -> Iterator[dict]:
        shards = wds.split_by_worker(iter([{"url": u} for u in self.urls]))
        samples = tar_samples(shards)
        items = (item for item in map(self._item, samples) if item is not None)
        yield from batched(items, self.batch_size, self.tokenizer, self.max_length, partial=True)


def eval_loader(urls: list[str], cfg: Any, tokenizer: Any, batch_size: int, workers: int = 0, keep_originals: bool = False) -> DataLoader:
    stream = EvalStream(urls, cfg.image_size, batch_size, tokenizer, cfg.max_text_length, keep_originals)
    return DataLoader(stream, batch_size=None, num_workers=min(workers, len(urls)))

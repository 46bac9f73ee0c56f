"""Streaming input: sgdata shards -> batches in the table of docs/architecture.md.

Why it is built this way:
- One sample per *image* with all its phrases, so the contrastive loss can treat every phrase of an
  image as a positive for that image (docs/method.md); a batch holds B images and up to
  `max_texts_per_image` phrases of each.
- The training stream is endless: every (rank, worker) reads an infinite, epoch-seeded sequence of
  shards and the trainer takes exactly `steps_per_epoch` batches per epoch. Ranks with fewer samples
  wrap around instead of running dry, so no rank waits on another at the epoch's end.
- The epoch (and, on resume, how many batches of it are already done) lives in shared memory
  (`EpochState`), OpenCLIP-style, so `DataInfo.set_epoch(e)` reaches the pipeline inside the
  dataloader workers; all randomness is derived from (seed, epoch, rank, worker), so an epoch is
  reproducible and a resumed run sees the same batches as an uninterrupted one.
- With a frozen encoder the stream reads cached features (sgmodel.features) instead of decoding
  images, so a frozen encoder costs nothing per epoch.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import random
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from sgdata.format import UserError, decode_rgb, parse_mixture, sample_texts, text_refs
from sgdata.format.storage import is_url, open_shard, read_text
from sgmodel.batch import Batch

# ---- shard lists ---------------------------------------------------------------------------------


def tar_samples(shards: Iterator[dict], handler: Callable = wds.reraise_exception,
                select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """webdataset's tar-to-samples stage, with each shard opened by `sgdata.format.storage.open_shard`,
    so local paths and object-storage URLs (s3://...) stream the same way."""

    def opened(shards):
        for shard in shards:
            try:
                stream = open_shard(shard["url"])
            except Exception as exn:
                exn.args = exn.args + (shard["url"],)
                if handler(exn):
                    continue
                break
            try:
                yield dict(shard, stream=stream)
            finally:
                stream.close()

    files = wds.tariterators.tar_file_expander(opened(shards), handler=handler, select_files=select_files)
    return wds.tariterators.group_by_keys(files, handler=handler)


def _folder_of(url: str) -> str:
    return url.rpartition("/")[0] if is_url(url) else os.path.dirname(os.path.abspath(url))


def _sizes_index(folder: str) -> dict[str, int]:
    """Sample counts per shard file name from sgdata's sizes.json (or a wids index) in `folder`."""
    for name in ("sizes.json", "index.wids.json"):
        try:
            text = read_text(f"{folder}/{name}")
            data = json.loads(text) if text is not None else None
        except (OSError, ValueError):
            continue
        if data is None:
            continue
        if isinstance(data, dict) and isinstance(data.get("shardlist"), list):  # wids: [{"url", "nsamples"}]
            return {Path(s["url"]).name: int(s["nsamples"]) for s in data["shardlist"] if "url" in s and "nsamples" in s}
        if isinstance(data, dict):
            table = data.get("shards", data)
            if isinstance(table, dict):
                return {Path(k).name: int(v) for k, v in table.items() if isinstance(v, (int, float))}
    return {}


def _count_tar_samples(url: str) -> int:
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            return len({base_plus_ext(m.name)[0] for m in tar if m.isfile()} - {None})  # keys as webdataset groups them
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"shard {url} cannot be read as a tar file ({exc})") from None


def count_samples(urls: list[str]) -> int:
    """Total samples in `urls`: from sizes.json beside the shards, else by listing each tar."""
    indexes: dict[str, dict[str, int]] = {}
    total = 0
    for url in urls:
        folder = _folder_of(url)
        if folder not in indexes:
            indexes[folder] = _sizes_index(folder)
        name = url.rpartition("/")[2]
        total += indexes[folder][name] if name in indexes[folder] else _count_tar_samples(url)
    return total


# ---- one sample ----------------------------------------------------------------------------------


def image_to_tensor(image: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) at the training size (aspect not kept, bilinear).

    Pixels stay uint8 until the image encoder (encoders.normalize_pixels): a quarter of the bytes to
    hand from loader workers to the trainer, and no float pass in the workers.
    """
    height, width = image_size
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def decode_image(data: bytes, image_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shard `jpg` bytes -> (uint8 (3, H, W) tensor at the training size, (height, width) of the stored image)."""
    image = decode_rgb(data)
    return image_to_tensor(image, image_size), (image.height, image.width)


def select_texts(texts: list[str], limit: int, seed: int, epoch: int, key: str) -> list[str]:
    """Up to `limit` phrases, a random subset that depends only on (seed, epoch, key).

    Keyed by the sample rather than drawn from a stream, so the choice does not depend on the
    worker layout or on where a resumed run starts.
    """
    if limit <= 0 or len(texts) <= limit:
        return texts
    rng = random.Random(zlib.crc32(f"{seed}:{epoch}:{key}".encode()))
    return [texts[i] for i in sorted(rng.sample(range(len(texts)), limit))]


# ---- batches -------------------------------------------------------------------------------------


def collate(items: list[dict], tokenizer: Any, max_length: int) -> Batch:
    """Per-image items -> one batch (sgmodel/batch.py)."""
    texts = [t for item in items for t in item["texts"]]
    index = [i for i, item in enumerate(items) for _ in item["texts"]]
    groups: dict[tuple[int, int], int] = {}  # (image, ref within it) -> a ref id unique in the batch
    refs = [groups.setdefault((i, r), len(groups)) if r >= 0 else -1
            for i, item in enumerate(items) for r in item.get("text_refs", [-1] * len(item["texts"]))]
    batch: Batch = {
        "keys": [item["key"] for item in items],
        "texts": texts,
        "text_image_index": torch.tensor(index, dtype=torch.long),  # (T,)
        "text_ref_index": torch.tensor(refs, dtype=torch.long),  # (T,): phrases naming one object share it; -1 unknown
    }
    if "image_tokens" in items[0]:
        batch["image_tokens"] = torch.stack([item["image_tokens"] for item in items]).float()  # (B, N, C)
    else:
        batch["images"] = torch.stack([item["image"] for item in items])  # (B, 3, H, W) uint8
    if "text_feats" in items[0]:
        batch["text_feats"] = torch.cat([item["text_feats"] for item in items]).float()  # (T, Ct)
    # token ids always: the text encoder reads them, and so does the word-embedding head beside cached features
    from sgmodel.encoders import tokenize

    batch["input_ids"], batch["attention_mask"] = tokenize(tokenizer, texts, max_length)  # (T, L) each
    if "masks" in items[0]:
        batch["masks"] = [m for item in items for m in item["masks"]]  # list (T) of RLE dicts {"size": [H_t, W_t], "counts": str}
    if "ref_ids" in items[0]:
        batch["ref_ids"] = [r for item in items for r in item["ref_ids"]]  # list (T): stored ref ids (evaluation)
    if "original" in items[0]:
        batch["originals"] = [item["original"] for item in items]  # list (B) of uint8 tensors (H, W, 3)
    return batch


def batched(items: Iterator[dict], size: int, tokenizer: Any, max_length: int, partial: bool) -> Iterator[dict]:
    """Collated batches of `size` items; the last, shorter one only when `partial` (evaluation)."""
    while True:
        chunk = list(itertools.islice(items, size))
        if len(chunk) == size or (chunk and partial):
            yield collate(chunk, tokenizer, max_length)
        if len(chunk) < size:
            return


# ---- training stream -----------------------------------------------------------------------------


class EpochState:
    """The epoch and the batches of it already done, in shared memory so dataloader workers see updates."""

    def __init__(self) -> None:
        self._epoch = mp.Value("i", 0)
        self._skip = mp.Value("i", 0)

    def set(self, epoch: int, skip_batches: int = 0) -> None:
        self._epoch.value = epoch
        self._skip.value = skip_batches

    def get(self) -> tuple[int, int]:
        return self._epoch.value, self._skip.value


def _endless_shard_order(urls: list[str], seed: int, epoch: int) -> Iterator[dict]:
    """Passes over `urls`, each in a new order seeded by (seed, epoch, pass); the same on every rank."""
    for n_pass in itertools.count():
        order = list(urls)
        random.Random(zlib.crc32(f"shards:{seed}:{epoch}:{n_pass}".encode())).shuffle(order)
        for url in order:
            yield {"url": url}


def _parsed(samples: Iterator[dict], needs_jpg: bool) -> Iterator[dict]:
    """Raw tar samples -> samples with `texts`; samples without any phrase are reported and skipped."""
    dropped = 0
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError):
            meta = None
        texts = sample_texts(meta) if isinstance(meta, dict) else []
        if not texts or (needs_jpg and "jpg" not in sample):
            dropped += 1
            if dropped in (1, 10, 100, 1000) or dropped % 10000 == 0:
                warnings.warn(f"skipped {dropped} sample(s) without phrases or image so far (last: {sample.get('__key__')} in {sample.get('__url__')})")
            continue
        sample["texts"] = texts
        sample["text_refs"] = text_refs(meta, texts)
        yield sample


def _mixed(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Draw each sample from stream i with probability weights[i] / sum(weights).

    Not wds.RandomMix: that draws from the process-global `random`, which would make the mixture
    differ between runs and disturb the trainer's saved RNG state; this one uses its own seeded rng.
    """
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights=weights)[0]])


def worker_skip(skip_batches: int, worker: int, num_workers: int) -> int:
    """Of the first `skip_batches` batches a DataLoader yields (round-robin over workers), how many are this worker's."""
    return max(0, (skip_batches - worker + num_workers - 1) // num_workers)


class TrainStream(IterableDataset):
    """Endless batches for one rank: shards split by node and worker, shuffled per epoch, mixed, collated."""

    def __init__(self, mixture: list[tuple[list[str], float]], cfg: Any, tokenizer: Any, state: EpochState, features: Any = None):
        super().__init__()
        self.mixture = mixture
        self.image_size = tuple(cfg.image_size)
        self.batch_size = cfg.batch_size
        self.max_texts = cfg.max_texts_per_image
        self.shuffle_buffer = cfg.shuffle_buffer
        self.seed = cfg.seed
        self.max_length = cfg.max_text_length
        self.tokenizer = tokenizer
        self.state = state
        self.features = features  # sgmodel.features.FeatureLookup or None

    def _samples(self, urls: list[str], epoch: int, worker: int, num_workers: int, rng_seed: int) -> Iterator[dict]:
        shards = _endless_shard_order(urls, self.seed, epoch)
        shards = wds.split_by_node(shards)  # explicit node splitter: rank r takes every world-th shard
        shards = itertools.islice(shards, worker, None, num_workers)  # worker splitter (see __iter__ for `worker`)
        skip_images = self.features is not None and self.features.has_images
        select = (lambda name: not name.endswith(".jpg")) if skip_images else None
        samples = tar_samples(shards, handler=wds.warn_and_continue, select_files=select)
        samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=random.Random(rng_seed))(samples)
        return _parsed(samples, needs_jpg=not skip_images)

    def _materialise(self, sample: dict, epoch: int) -> dict:
        key, url = sample["__key__"], sample["__url__"]
        chosen = select_texts(list(range(len(sample["texts"]))), self.max_texts, self.seed, epoch, key)
        texts = [sample["texts"][i] for i in chosen]
        item: dict[str, Any] = {"key": key, "texts": texts, "text_refs": [sample["text_refs"][i] for i in chosen]}
        if self.features is not None and self.features.has_images:
            item["image_tokens"] = self.features.image_tokens(url, key)  # (N, C) fp16
        else:
            item["image"], _ = decode_image(sample["jpg"], self.image_size)  # (3, H, W)
        if self.features is not None and self.features.has_texts:
            item["text_feats"] = self.features.text_feats(url, texts)  # (k, Ct) fp16
        return item

    def __iter__(self) -> Iterator[dict]:
        epoch, skip_batches = self.state.get()
        rank, _, loader_worker, num_workers = wds.utils.pytorch_worker_info()
        # The DataLoader takes batches from its workers round-robin, starting with worker 0. Batch j of
        # the epoch is made by "role" j % num_workers; a run resumed at batch `skip_batches` starts with
        # worker 0 making batch `skip_batches`, so worker w plays role (w + skip_batches) % num_workers
        # and skips that role's batches already trained on (before decoding anything).
        role = (loader_worker + skip_batches) % num_workers
        base = zlib.crc32(f"samples:{self.seed}:{epoch}:{rank}:{role}".encode())
        streams = [self._samples(urls, epoch, role, num_workers, base + i) for i, (urls, _) in enumerate(self.mixture)]
        samples = _mixed(streams, [w for _, w in self.mixture], random.Random(base))
        samples = itertools.islice(samples, worker_skip(skip_batches, role, num_workers) * self.batch_size, None)
        items = (self._materialise(s, epoch) for s in samples)
        yield from batched(items, self.batch_size, self.tokenizer, self.max_length, partial=False)


PREFETCH_BATCHES = 4  # batches each worker keeps ready on a GPU machine (the DataLoader's default is 2)


@dataclass
class DataInfo:
    """A rank's training input: the loader, the steps every rank runs per epoch, and the epoch switch."""

    loader: DataLoader
    steps_per_epoch: int
    set_epoch: Callable[..., None]
    samples: int = 0  # samples in all shard sets together
    warnings: list[str] = field(default_factory=list)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches `start` .. steps_per_epoch-1 of `epoch` (the same batches whatever `start` is)."""
        self.set_epoch(epoch, start)
        iterator = iter(self.loader)
        for _ in range(self.steps_per_epoch - start):
            yield next(iterator)


def train_data(cfg: Any, tokenizer: Any, rank: int = 0, world: int = 1, features: Any = None, on_cuda: bool = False,
               persistent_workers: bool | None = None) -> DataInfo:
    """The training input of one rank (rank and world are those the node splitter sees).

    On a GPU (on_cuda) batches arrive in pinned memory (their copy to the device overlaps compute),
    each worker keeps PREFETCH_BATCHES batches ready, and workers persist across epochs
    (persistent_workers defaults to on_cuda): a new epoch re-enters the same worker processes, which
    read the epoch and the batches to skip from the shared EpochState, so no epoch pays the start-up
    of a worker pool (imports, tokenizer) again.
    """
    mixture = parse_mixture(cfg.train_shards)
    samples = sum(count_samples(urls) for urls, _ in mixture)
    if samples == 0:
        raise UserError(f"the shards of {cfg.train_shards!r} hold no samples")
    steps = samples // (cfg.batch_size * world)
    notes = []
    if steps == 0:
        notes.append(f"the shards hold {samples} samples, fewer than one step of {cfg.batch_size} images x {world} rank(s); an epoch is one step (samples repeat)")
        steps = 1
    readers = world * max(1, cfg.workers)
    for urls, _ in mixture:
        if len(urls) < readers:
            notes.append(f"{len(urls)} shard(s) for {world} rank(s) x {max(1, cfg.workers)} worker(s): some readers share shards, so samples repeat within an epoch; write more, smaller shards (sgdata build --shard-size)")
    for note in notes:
        warnings.warn(note)
    state = EpochState()
    stream = TrainStream(mixture, cfg, tokenizer, state, features)
    persistent = (on_cuda if persistent_workers is None else persistent_workers) and cfg.workers > 0
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        num_workers=cfg.workers,
        pin_memory=on_cuda,
        persistent_workers=persistent,
        prefetch_factor=PREFETCH_BATCHES if on_cuda and cfg.workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched by the loader
    )
    return DataInfo(loader, steps, state.set, samples, notes)

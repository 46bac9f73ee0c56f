"""Frozen-encoder feature cache: a frozen encoder runs once per sample, not once per epoch.

When `freeze_image_encoder` (or `freeze_text_encoder`) is set, the encoder's output never changes,
so `python -m sgmodel.train` computes it once per shard and the training stream reads it back
(sgmodel.data.TrainStream) instead of decoding images or running the text encoder.

Layout (one folder per encoder fingerprint, one file per shard):

    <cache>/image/<encoder fingerprint>/<shard fingerprint>.pt   keys, fp16 token grids (S, N, C),
                                                                 per-channel sums for the statistics
    <cache>/text/<encoder fingerprint>/<shard fingerprint>.pt    unique phrases, fp16 vectors (U, Ct)

The encoder fingerprint is the encoder's identity() (kind, weights source, block) plus the image
size or tokenizer settings and a digest of its weights; the shard fingerprint is the shard's path,
size and modification time. Anything that changes the features therefore lands in a new file:
the cache is never stale, only unused (delete the folder to reclaim space). Files are written under
a temporary name and renamed, so an interrupted build leaves no half file.

The per-channel mean/std of the image tokens (standardised features learn far better: docs/method.md)
come from the same files; the trainer puts them into the model (`set_feature_stats`), so they travel
in the checkpoint and evaluate/predict need only the checkpoint and the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sgdata.format import UserError, sample_texts
from sgdata.format.storage import is_url
from sgdata.format.storage import stat as shard_stat
from sgmodel import distributed as dist
from sgmodel.checkpoint import atomic_torch_save
from sgmodel.data import count_samples, decode_image, tar_samples

FORMAT = "sgmodel-features/1"
FP16_MAX = 65504.0


def cache_root(cfg: Any) -> Path:
    return Path(cfg.data.feature_cache).expanduser() if cfg.data.feature_cache else Path.home() / ".cache" / "sgmodel" / "features"


def encoder_fingerprint(encoder: torch.nn.Module, settings: str) -> str:
    """identity() + settings + a cheap digest of the weights (shapes, first values, sums of every tensor).

    The weight digest matters for randomly initialised encoders, whose identity() cannot tell two
    seeds apart.
    """
    digest = hashlib.sha1(f"{encoder.identity()}|{settings}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        values = tensor.detach().flatten().double()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values[:16].cpu().numpy().tobytes())
        digest.update(np.float64(values.sum().item()).tobytes())
    return digest.hexdigest()[:20]


def _where(url: str) -> str:
    return url if is_url(url) else os.path.abspath(url)


def shard_fingerprint(url: str) -> str:
    """Names one version of a shard: its location, size and modification time (an ETag on object storage)."""
    size, version = shard_stat(url)
    return hashlib.sha1(f"{_where(url)}|{size}|{version}".encode()).hexdigest()[:20]


def _shard_samples(url: str) -> Any:
    return tar_samples(iter([{"url": url}]))


def _chunks(iterable, size: int):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def build_image_features(encoder: torch.nn.Module, url: str, image_size: tuple[int, int], batch_size: int, device: torch.device, identity: str, progress: tqdm | None = None) -> dict:
    """Run the frozen image encoder over one shard: fp16 token grids per key + per-channel sums."""
    keys, grids = [], []
    channel_sum = channel_sqsum = None
    count = 0
    for chunk in _chunks(_shard_samples(url), batch_size):
        chunk = [s for s in chunk if "jpg" in s]
        if not chunk:
            continue
        images = torch.stack([decode_image(s["jpg"], image_size)[0] for s in chunk]).to(device)  # (b, 3, H, W)
        tokens = encoder(images).float()  # (b, N, C)
        flat = tokens.reshape(-1, tokens.shape[-1]).double()  # (b*N, C)
        channel_sum = flat.sum(0) if channel_sum is None else channel_sum + flat.sum(0)  # (C,)
        channel_sqsum = (flat**2).sum(0) if channel_sqsum is None else channel_sqsum + (flat**2).sum(0)  # (C,)
        count += flat.shape[0]
        grids.append(tokens.clamp(-FP16_MAX, FP16_MAX).half().cpu())
        keys.extend(s["__key__"] for s in chunk)
        if progress is not None:
            progress.update(len(chunk))
    width = getattr(encoder, "out_dim", 0)
    return {
        "format": FORMAT,
        "identity": identity,
        "shard": _where(url),
        "keys": keys,
        "tokens": torch.cat(grids) if grids else torch.zeros(0, 0, width, dtype=torch.float16),  # (S, N, C)
        "sum": channel_sum.cpu() if channel_sum is not None else torch.zeros(width, dtype=torch.float64),
        "sqsum": channel_sqsum.cpu() if channel_sqsum is not None else torch.zeros(width, dtype=torch.float64),
        "count": count,
    }


@torch.no_grad()
def build_text_features(encoder: torch.nn.Module, tokenizer: Any, url: str, max_length: int, batch_size: int, device: torch.device, identity: str) -> dict:
    """Run the frozen text encoder once per unique phrase of one shard."""
    from sgmodel.encoders import tokenize

    texts = list(dict.fromkeys(t for s in _shard_samples(url) if "json" in s for t in sample_texts(json.loads(s["json"]))))
    feats = []
    for chunk in _chunks(texts, max(1, batch_size * 8)):
        input_ids, attention_mask = tokenize(tokenizer, chunk, max_length)  # (t, L) each
        vectors = encoder(input_ids.to(device), attention_mask.to(device)).float()  # (t, Ct)
        feats.append(vectors.clamp(-FP16_MAX, FP16_MAX).half().cpu())
    width = getattr(encoder, "out_dim", 0)
    return {
        "format": FORMAT,
        "identity": identity,
        "shard": _where(url),
        "texts": texts,
        "feats": torch.cat(feats) if feats else torch.zeros(0, width, dtype=torch.float16),  # (U, Ct)
    }


def _open(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a damaged file is a cache problem the user can fix by deleting it
        raise UserError(f"feature cache file {path} cannot be read ({type(exc).__name__}); delete it and rerun to rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a feature cache file of this sgmodel version; delete it and rerun")
    return data


class FeatureLookup:
    """Cached features by (shard url, key / phrase). Holds only paths, so it pickles into dataloader workers;
    each process opens (memory-maps) the shard files it needs and keeps the last few open."""

    def __init__(self, image_files: dict[str, Path], text_files: dict[str, Path], keep_open: int = 8):
        self.image_files = image_files
        self.text_files = text_files
        self.keep_open = keep_open
        self._opened: OrderedDict[Path, dict] = OrderedDict()

    @property
    def has_images(self) -> bool:
        return bool(self.image_files)

    @property
    def has_texts(self) -> bool:
        return bool(self.text_files)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_opened"] = OrderedDict()
        return state

    def _shard(self, path: Path, index_field: str) -> dict:
        if path in self._opened:
            self._opened.move_to_end(path)
            return self._opened[path]
        data = _open(path)
        data["index"] = {name: row for row, name in enumerate(data[index_field])}
        self._opened[path] = data
        if len(self._opened) > self.keep_open:
            self._opened.popitem(last=False)
        return data

    def image_tokens(self, url: str, key: str) -> torch.Tensor:
        data = self._shard(self.image_files[url], "keys")
        if key not in data["index"]:
            raise UserError(f"feature cache {self.image_files[url]} lacks sample {key} of {url}; delete the cache folder and rerun")
        return data["tokens"][data["index"][key]]  # (N, C) fp16

    def text_feats(self, url: str, texts: list[str]) -> torch.Tensor:
        data = self._shard(self.text_files[url], "texts")
        try:
            rows = [data["index"][t] for t in texts]
        except KeyError as exc:
            raise UserError(f"feature cache {self.text_files[url]} lacks phrase {exc.args[0]!r} of {url}; delete the cache folder and rerun") from None
        return data["feats"][rows]  # (k, Ct) fp16

    def stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel mean and std of the cached image tokens over every shard."""
        return image_token_stats(list(self.image_files.values())) if self.image_files else None


def image_token_stats(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-shard sums into the per-channel (mean, std) of all tokens, float32 (C,) each."""
    total = total_sq = None
    count = 0
    for path in paths:
        data = _open(path)
        if data["count"] == 0:
            continue
        total = data["sum"] if total is None else total + data["sum"]
        total_sq = data["sqsum"] if total_sq is None else total_sq + data["sqsum"]
        count += data["count"]
    if count == 0:
        raise UserError("the feature cache holds no image tokens; the training shards have no decodable images")
    mean = total / count  # (C,)
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()  # (C,)
    return mean.float(), std.float()


def _describe(folder: Path, identity: str, settings: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "identity.json"
    if not info.exists():
        info.write_text(json.dumps({"identity": identity, "settings": settings}, indent=1) + "\n")


def ensure_feature_cache(model: Any, cfg: Any, urls: list[str], device: torch.device, tokenizer: Any = None) -> FeatureLookup | None:
    """Build what is missing of the cache for every frozen encoder and return the lookup (None: nothing frozen).

    With several ranks each builds every world-th missing shard and all wait at a barrier, so the
    work is shared and every rank then reads the same files (the cache folder must be on storage
    every node sees, or each node builds its own copy with `--feature-cache` on local disk).
    """
    if not cfg.data.cache_features or not (cfg.image.freeze_image_encoder or cfg.text.freeze_text_encoder):
        return None
    root = cache_root(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    image_files: dict[str, Path] = {}
    text_files: dict[str, Path] = {}
    jobs = []  # (kind, url, path)
    if cfg.image.freeze_image_encoder:
        settings = f"image_size={tuple(cfg.image.image_size)}"
        image_fp = encoder_fingerprint(model.image_encoder, settings)
        _describe(root / "image" / image_fp, model.image_encoder.identity(), settings)
        image_files = {u: root / "image" / image_fp / f"{shard_fingerprint(u)}.pt" for u in urls}
        jobs += [("image", u, p) for u, p in image_files.items()]
    if cfg.text.freeze_text_encoder:
        settings = f"tokenizer={cfg.text.tokenizer_path or cfg.text.text_encoder_path}|max_length={cfg.text.max_text_length}|pooling={cfg.text.text_pooling}"
        text_fp = encoder_fingerprint(model.text_encoder, settings)
        _describe(root / "text" / text_fp, model.text_encoder.identity(), settings)
        text_files = {u: root / "text" / text_fp / f"{shard_fingerprint(u)}.pt" for u in urls}
        jobs += [("text", u, p) for u, p in text_files.items()]
    # Split every file (not only the missing ones) by rank: ranks check existence at different moments,
    # so a split of the missing ones could differ between ranks and leave a file to nobody.
    mine = [job for job in jobs[rank::world] if not job[2].exists()]
    if mine:
        if tokenizer is None and any(kind == "text" for kind, _, _ in mine):
            from sgmodel.encoders import build_tokenizer

            tokenizer = build_tokenizer(cfg.text)
        image_urls = [u for kind, u, _ in mine if kind == "image"]
        bar = tqdm(total=count_samples(image_urls) if image_urls else 0, desc=f"feature cache ({len(mine)} shard file(s))", unit="img", disable=rank != 0, dynamic_ncols=True)
        for kind, url, path in mine:
            if kind == "image":
                data = build_image_features(model.image_encoder, url, tuple(cfg.image.image_size), cfg.optim.batch_size, device, model.image_encoder.identity(), bar)
            else:
                data = build_text_features(model.text_encoder, tokenizer, url, cfg.text.max_text_length, cfg.optim.batch_size, device, model.text_encoder.identity())
            atomic_torch_save(data, path)
        bar.close()
    dist.barrier()
    absent = [str(p) for _, _, p in jobs if not p.exists()]
    if absent:
        raise UserError(f"feature cache file {absent[0]} was not built by its rank; on several nodes --feature-cache must be a folder every node sees")
    return FeatureLookup(image_files, text_files)

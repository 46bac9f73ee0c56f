"""The frozen-encoder feature cache: built once, read every epoch, invalidated by the encoder, stats round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sgmodel.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sgdata.format import expand_shards
from sgmodel.data import decode_image, train_data
from sgmodel.encoders import build_tokenizer
from sgmodel.features import ensure_feature_cache
from sgmodel.model import ShatterAndGather
from sgmodel.train import main
from tests.helpers.shards import write_shards
from tests.helpers.tiny_model import tiny_yaml_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("feature_shards")
    write_shards(folder, [5, 4], seed=6)
    return str(folder)


def _frozen_cfg(shards: str, cache: Path, **fields):
    values = dict(train_shards=shards, feature_cache=str(cache), freeze_image_encoder=True, freeze_text_encoder=True,
                  standardize_features=True, batch_size=3)
    return tiny_yaml_config(**{**values, **fields})


def _count_calls(module: torch.nn.Module) -> dict:
    calls = {"n": 0}
    forward = module.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def _cache_files(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).rglob("*.pt"))


def test_cache_is_built_once_and_read_every_epoch(shards, tmp_path):
    cfg = _frozen_cfg(shards, tmp_path / "cache")
    tokenizer = build_tokenizer(cfg.text)
    model = ShatterAndGather(cfg, tokenizer)
    image_calls, text_calls = _count_calls(model.image_encoder), _count_calls(model.text_encoder)
    urls = expand_shards(shards)

    lookup = ensure_feature_cache(model, cfg, urls, torch.device("cpu"), tokenizer)
    assert image_calls["n"] > 0 and text_calls["n"] > 0
    assert len(_cache_files(tmp_path / "cache", "image")) == len(_cache_files(tmp_path / "cache", "text")) == 2
    built = dict(image_calls), dict(text_calls)

    data = train_data(cfg, tokenizer, features=lookup)
    for epoch in range(2):
        for batch in data.epoch_batches(epoch):
            assert "images" not in batch  # token ids still come: the word-embedding head reads them
            assert batch["image_tokens"].shape == (3, 64, model.image_encoder.out_dim)  # 8x8 grid
            assert batch["text_feats"].shape == (len(batch["texts"]), model.text_encoder.out_dim)
            model(batch)  # the model trains on cached features
    again = ensure_feature_cache(model, cfg, urls, torch.device("cpu"), tokenizer)
    assert (dict(image_calls), dict(text_calls)) == built  # no encoder call after the first build
    assert again.image_files == lookup.image_files

    # the cached tokens are the encoder's output for that image (fp16)
    sample_key = next(data.epoch_batches(0))["keys"][0]
    url = next(u for u in urls if sample_key in _keys_of(u))
    cached = lookup.image_tokens(url, sample_key).float()
    import webdataset as wds

    raw = next(s for s in wds.tarfile_to_samples()(iter([{"url": url}])) if s["__key__"] == sample_key)
    with torch.no_grad():
        live = model.image_encoder(decode_image(raw["jpg"], cfg.image_size)[0][None])[0]
    assert torch.allclose(cached, live, atol=1e-2, rtol=1e-2)


def _keys_of(url: str) -> set[str]:
    import tarfile

    with tarfile.open(url) as tar:
        return {m.name.split(".")[0] for m in tar}


def test_cache_is_invalidated_when_the_encoder_changes(shards, tmp_path):
    cache = tmp_path / "cache"
    urls = expand_shards(shards)

    def build(**fields) -> tuple[int, object]:
        cfg = _frozen_cfg(shards, cache, freeze_text_encoder=False, **fields)
        model = ShatterAndGather(cfg)
        calls = _count_calls(model.image_encoder)
        lookup = ensure_feature_cache(model, cfg, urls, torch.device("cpu"))
        return calls["n"], lookup

    first, lookup = build()
    assert first > 0 and not lookup.has_texts  # a trainable text encoder is not cached
    assert build()[0] == 0  # same encoder: reused
    assert build(seed=1)[0] > 0  # other random weights
    assert build(vit_layers=1)[0] > 0  # another encoder
    eff = dict(image_encoder="efficientnet_lite", image_encoder_path="", efficientnet_block=1)
    assert build(**eff)[0] > 0
    assert build(**eff)[0] == 0
    assert build(**{**eff, "efficientnet_block": 2})[0] > 0  # another block
    identities = [json.loads((f / "identity.json").read_text())["identity"] for f in (cache / "image").iterdir()]
    assert len(identities) == 5  # one folder per encoder fingerprint, each described for people
    assert sum("block=1" in i for i in identities) == sum("block=2" in i for i in identities) == 1


def test_statistics_round_trip_through_the_checkpoint(shards, tmp_path):
    cfg = _frozen_cfg(shards, tmp_path / "cache")
    model = ShatterAndGather(cfg)
    urls = expand_shards(shards)
    lookup = ensure_feature_cache(model, cfg, urls, torch.device("cpu"))
    mean, std = lookup.stats()
    tokens = torch.cat([torch.load(p, weights_only=True)["tokens"].float().flatten(0, 1) for p in lookup.image_files.values()])
    assert torch.allclose(mean, tokens.mean(0), atol=1e-3)
    assert torch.allclose(std, tokens.std(0, unbiased=False), atol=1e-3)

    model.set_feature_stats(mean, std)
    save_checkpoint(tmp_path / "c.pt", cfg=cfg, step=1, epoch=0, model=model, feature_stats=(mean, std))
    fresh = ShatterAndGather(cfg)
    assert not torch.allclose(fresh.feature_mean, mean)
    load_model_state(fresh, load_checkpoint(tmp_path / "c.pt"))
    assert torch.equal(fresh.feature_mean, mean) and torch.allclose(fresh.feature_std, std)


def test_trainer_builds_the_cache_by_itself_and_stores_the_stats(shards, tmp_path):
    cache = tmp_path / "cache"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", shards, "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "3", "--feature-cache", str(cache), "--freeze-image-encoder", "true",
            "--freeze-text-encoder", "true", "--standardize-features", "true"]
    assert main(argv) == 0
    assert len(_cache_files(cache, "image")) == 2
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    stats = state["feature_stats"]
    assert stats is not None and torch.equal(state["model"]["feature_mean"], stats["mean"])
    assert not torch.allclose(stats["std"], torch.ones_like(stats["std"]))

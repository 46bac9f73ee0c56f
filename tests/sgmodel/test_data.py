"""sgmodel.data and sgmodel.eval_data: shard specs, sample counts, the per-epoch training stream, collation, the eval stream."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from sgdata.format import UserError, expand_shards, parse_mixture, rle_to_mask, sample_texts
from sgmodel.data import count_samples, train_data, worker_skip
from sgmodel.eval_data import check_eval_shards, eval_loader
from sgmodel.encoders import build_tokenizer, normalize_pixels
from tests.helpers.shards import write_shards
from tests.helpers.tiny_model import tiny_yaml_config


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root / "refcoco" / "train", [5, 3, 1], seed=1)
    write_shards(root / "captions" / "train", [4, 4], kind="captions", seed=2)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_yaml_config().text)


def _keys(batches) -> list[list[str]]:
    return [b["keys"] for b in batches]


# ---- shard specs -------------------------------------------------------------------------------


def test_expand_shards_accepts_dir_glob_brace_and_list(shard_dir):
    train = shard_dir / "refcoco" / "train"
    expected = [str(train / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(train)) == expected
    assert expand_shards(str(train / "train-*.tar")) == expected
    assert expand_shards(str(train / "train-{000000..000002}.tar")) == expected
    assert expand_shards(f"{expected[2]},{expected[0]}") == [expected[2], expected[0]]
    assert len(expand_shards(str(shard_dir))) == 5  # every .tar below a directory, nested too
    # a brace list with commas is one part, not split at its commas
    assert expand_shards(str(train / "train-{000000,000002}.tar")) == [expected[0], expected[2]]


def test_expand_shards_errors_are_one_sentence(tmp_path, shard_dir):
    with pytest.raises(UserError, match="no shards match"):
        expand_shards(str(tmp_path))
    with pytest.raises(UserError, match="no shards match"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(UserError, match="does not exist"):
        expand_shards(str(shard_dir / "refcoco" / "train" / "train-{000000..000009}.tar"))
    with pytest.raises(UserError, match="no shards match"):
        expand_shards("")


def test_parse_mixture(shard_dir):
    ref, cap = shard_dir / "refcoco" / "train", shard_dir / "captions" / "train"
    single = parse_mixture(str(ref))
    assert single == [(expand_shards(str(ref)), 1.0)]
    mix = parse_mixture(f"{ref}:0.75,{cap}:.25")
    assert [w for _, w in mix] == [0.75, 0.25]
    assert [len(u) for u, _ in mix] == [3, 2]
    with pytest.raises(UserError, match="needs a weight"):
        parse_mixture(f"{ref}:0.5,{cap}")


def test_count_samples_from_sizes_json_and_from_tars(tmp_path):
    urls = write_shards(tmp_path / "a", [3, 2], seed=3)
    assert count_samples(urls) == 5
    (tmp_path / "a" / "sizes.json").unlink()
    assert count_samples(urls) == 5
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"train-000000.tar": 7}))  # index wins where it has the shard
    assert count_samples(urls) == 9


def test_sample_texts_for_both_shard_kinds():
    ref = {"refs": [{"sentences": [{"text": "the dog"}, {"text": " "}]}, {"sentences": [{"text": "the dog"}, {"text": "a cat"}]}]}
    assert sample_texts(ref) == ["the dog", "a cat"]
    assert sample_texts({"captions": ["a beach", "", "sunset"]}) == ["a beach", "sunset"]
    assert sample_texts({"captions": []}) == []


# ---- training stream ---------------------------------------------------------------------------


def test_batches_hold_images_and_their_phrases(shard_dir, tokenizer):
    cfg = tiny_yaml_config(train_shards=str(shard_dir / "refcoco" / "train"), batch_size=3, max_texts_per_image=2)
    data = train_data(cfg, tokenizer)
    assert data.steps_per_epoch == 9 // 3
    batch = next(data.epoch_batches(0))
    assert batch["images"].shape == (3, 3, 64, 64)
    assert batch["images"].dtype == torch.uint8 and batch["images"].max() > 0  # pixels; the encoder normalises
    normalized = normalize_pixels(batch["images"])
    assert normalized.dtype == torch.float32 and normalized.min() >= -1 and normalized.max() <= 1
    assert torch.allclose(normalized, batch["images"].float() / 127.5 - 1, atol=1e-6)
    assert len(batch["keys"]) == 3 and len(batch["texts"]) == batch["text_image_index"].numel() == 6
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 6
    # positives: every phrase belongs to the image its index names (fixture phrases name the key's objects)
    assert batch["text_image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    for text in batch["texts"]:
        assert text.split()[-2 if text.startswith("the") else 0] in {"red", "green", "blue"}


def test_epochs_shuffle_differently_and_reproducibly(shard_dir, tokenizer):
    cfg = tiny_yaml_config(train_shards=str(shard_dir / "refcoco" / "train"), batch_size=3, shuffle_buffer=4)
    data = train_data(cfg, tokenizer)
    first = _keys(data.epoch_batches(0))
    again = _keys(data.epoch_batches(0))
    second = _keys(data.epoch_batches(1))
    assert first == again
    assert first != second
    other_seed = _keys(train_data(tiny_yaml_config(train_shards=cfg.train_shards, batch_size=3, shuffle_buffer=4, seed=9), tokenizer).epoch_batches(0))
    assert other_seed != first


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_runs_the_same_steps_with_uneven_shards(shard_dir, tokenizer, monkeypatch, workers):
    """Shards of 5, 3 and 1 samples over 2 ranks: both ranks get exactly steps_per_epoch batches, twice over."""
    cfg = tiny_yaml_config(train_shards=str(shard_dir / "refcoco" / "train"), batch_size=2, workers=workers)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = train_data(cfg, tokenizer, rank=rank, world=2)
        assert data.steps_per_epoch == 9 // (2 * 2)
        if workers == 2:  # 3 shards < 2 ranks x 2 workers
            assert any("some readers share shards" in str(w.message) for w in caught)
        per_rank.append([_keys(data.epoch_batches(e)) for e in range(3)])
    for epochs in per_rank:
        assert [len(e) for e in epochs] == [data.steps_per_epoch] * 3
        assert all(len(keys) == 2 for e in epochs for keys in e)
    if workers == 0:  # the node splitter gives the ranks different shards: their first batches differ
        assert per_rank[0][0][0] != per_rank[1][0][0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_yields_the_same_remaining_batches(shard_dir, tokenizer, workers):
    cfg = tiny_yaml_config(train_shards=str(shard_dir / "refcoco" / "train"), batch_size=2, workers=workers)
    data = train_data(cfg, tokenizer)
    full = _keys(data.epoch_batches(1))
    assert len(full) == 4
    assert _keys(data.epoch_batches(1, start=3)) == full[3:]
    assert _keys(data.epoch_batches(1, start=1)) == full[1:]


def test_persistent_workers_serve_the_same_epochs_and_resumed_epochs(shard_dir, tokenizer):
    """On a GPU the workers persist across epochs: each epoch (and a resumed one) must still be the same batches."""
    cfg = tiny_yaml_config(train_shards=str(shard_dir / "refcoco" / "train"), batch_size=2, workers=2)
    fresh = train_data(cfg, tokenizer, persistent_workers=False)
    kept = train_data(cfg, tokenizer, persistent_workers=True)
    assert kept.loader.persistent_workers and not fresh.loader.persistent_workers
    for epoch, start in [(0, 0), (1, 0), (1, 3), (0, 1), (2, 0)]:
        assert _keys(kept.epoch_batches(epoch, start)) == _keys(fresh.epoch_batches(epoch, start)), (epoch, start)


def test_worker_skip_counts_round_robin_batches():
    # batches 0..4 over 2 workers: worker 0 made 0, 2, 4 and worker 1 made 1, 3
    assert [worker_skip(5, w, 2) for w in range(2)] == [3, 2]
    assert [worker_skip(0, w, 3) for w in range(3)] == [0, 0, 0]
    assert [worker_skip(1, w, 3) for w in range(3)] == [1, 0, 0]


def test_mixture_draws_from_both_sets(shard_dir, tokenizer):
    spec = f"{shard_dir / 'refcoco' / 'train'}:0.5,{shard_dir / 'captions' / 'train'}:0.5"
    cfg = tiny_yaml_config(train_shards=spec, batch_size=4)
    data = train_data(cfg, tokenizer)
    assert data.samples == 17
    keys = [k for batch in data.epoch_batches(0) for k in batch["keys"]]
    assert any(k.startswith("train_1_") for k in keys) and any(k.startswith("train_2_") for k in keys)
    texts = [t for batch in train_data(cfg, tokenizer).epoch_batches(0) for t in batch["texts"]]
    assert any(t.startswith("a picture with") for t in texts)  # caption samples train with their captions


def test_empty_shards_are_refused(tmp_path, tokenizer):
    urls = write_shards(tmp_path / "e", [0])
    with pytest.raises(UserError, match="hold no samples"):
        train_data(tiny_yaml_config(train_shards=urls[0]), tokenizer)


# ---- evaluation stream -------------------------------------------------------------------------


def test_eval_stream_yields_every_phrase_with_its_mask_once(tmp_path, tokenizer):
    urls = write_shards(tmp_path / "val", [3, 2], split="val", seed=5)
    cfg = tiny_yaml_config()
    batches = list(eval_loader(urls, cfg, tokenizer, batch_size=2, keep_originals=True))
    assert [len(b["keys"]) for b in batches] == [2, 2, 1]  # every sample once, the last batch partial
    assert len({k for b in batches for k in b["keys"]}) == 5
    for b in batches:
        assert len(b["masks"]) == len(b["texts"]) == 6 * len(b["keys"])  # 3 objects x 2 sentences
        for t, image in enumerate(b["text_image_index"].tolist()):
            h, w = b["originals"][image].shape[:2]  # the stored image's size
            assert b["masks"][t]["size"] == [h, w]  # the stored RLE: metrics work on its runs, never a dense mask
            mask = rle_to_mask(b["masks"][t])
            assert mask.shape == (h, w) and mask.dtype == bool and 0 < mask.sum() < h * w
    assert check_eval_shards(urls) == "val"


def test_eval_refuses_caption_shards(tmp_path):
    urls = write_shards(tmp_path / "cap", [2], kind="captions")
    with pytest.raises(UserError, match="no referring masks"):
        check_eval_shards(urls)

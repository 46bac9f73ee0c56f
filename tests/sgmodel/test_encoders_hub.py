"""Encoders named by Hugging Face Hub id resolve through huggingface_hub's cache, with no network.

The test writes the cache layout huggingface_hub keeps (models--org--name/snapshots/<commit>/ and
refs/main) with small random models in it, then loads them by id with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tests.helpers.tiny_model import tiny_config

from sgdata.format.errors import UserError
from sgmodel.encoders import build_image_encoder, build_text_encoder, build_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "dog", "on", "left", "##s"]


def cache_snapshot(cache: Path, repo: str) -> Path:
    """An empty snapshot folder of `repo` in the cache, registered as its `main` revision."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_encoders_and_tokenizer_load_by_hub_id_from_the_cache_offline(offline_cache, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vit = build_image_encoder(tiny_config().image, seed=5)
    vit_snapshot = cache_snapshot(offline_cache, "sgtest/tiny-vit")
    vit.vit.save_pretrained(vit_snapshot)

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    bert = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32), add_pooling_layer=False)
    bert_snapshot = cache_snapshot(offline_cache, "sgtest/tiny-bert")
    bert.save_pretrained(bert_snapshot)
    tokenizer.save_pretrained(bert_snapshot)

    cfg = tiny_config(image_encoder_path="sgtest/tiny-vit", text_encoder_path="sgtest/tiny-bert")
    image_encoder = build_image_encoder(cfg.image).eval()
    assert torch.equal(image_encoder.vit.embeddings.position_embeddings, vit.vit.embeddings.position_embeddings)
    assert image_encoder.identity().startswith(f"vit|hub:sgtest/tiny-vit@{vit_snapshot.name}:")

    loaded_tokenizer = build_tokenizer(cfg.text)
    assert loaded_tokenizer("the red dog")["input_ids"] == tokenizer("the red dog")["input_ids"]
    text_encoder = build_text_encoder(cfg.text, tokenizer=loaded_tokenizer)
    assert torch.equal(text_encoder.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert f"hub:sgtest/tiny-bert@{bert_snapshot.name}" in text_encoder.identity()


def test_an_offline_cache_miss_says_what_to_download_and_where(offline_cache):
    with pytest.raises(UserError) as caught:
        build_image_encoder(tiny_config(image_encoder_path="facebook/dino-vits16").image)
    message = str(caught.value)
    assert "`hf download facebook/dino-vits16`" in message and str(offline_cache) in message
    assert "\n" not in message
    with pytest.raises(UserError, match=r"`hf download sgtest/bert --revision v2`"):
        build_tokenizer(tiny_config(text_encoder_path="sgtest/bert@v2").text)


def test_a_local_folder_of_a_hub_id_shape_stays_a_folder(offline_cache, tmp_path, monkeypatch):
    vit = build_image_encoder(tiny_config().image, seed=6)
    (tmp_path / "models" / "vit").mkdir(parents=True)
    vit.vit.save_pretrained(tmp_path / "models" / "vit")
    monkeypatch.chdir(tmp_path)
    loaded = build_image_encoder(tiny_config(image_encoder_path="models/vit").image)
    assert torch.equal(loaded.vit.embeddings.position_embeddings, vit.vit.embeddings.position_embeddings)
    assert "hub:" not in loaded.identity()

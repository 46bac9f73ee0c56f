"""Shared tiny configurations and batches for the sgmodel tests.

Random tiny encoders (ViT 32x32 with 8-pixel patches, one-layer BERT over the byte tokenizer) keep
every model test at a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sgmodel.config import Config, from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]

PHRASES = ["the red ball", "a small blue square on the left", "green thing", "the red ball", "tree", "sky"]


def tiny_config(**overrides) -> Config:
    values = dict(
        image_encoder="vit",
        image_size=(32, 32),
        vit_hidden=32,
        vit_layers=1,
        vit_heads=2,
        vit_patch=8,
        bert_hidden=32,
        bert_layers=1,
        bert_heads=2,
        max_text_length=40,
        dim=32,
        slot_groups=2,
        slots_per_group=2,
        slot_iters=2,
        slot_cross_heads=2,
        slot_cross_head_dim=16,
        slot_self_heads=2,
        slot_self_head_dim=8,
        gather_heads=2,
        gather_head_dim=16,
        decoder_hidden=32,
        dropout=0.0,
        seed=0,
    )
    values.update(overrides)
    return from_dict(values)


def tiny_yaml_config(**overrides) -> Config:
    """configs/tiny.yaml with test-sized overrides (fields as keyword arguments): the shipped tiny recipe, for
    the data and training tests; `tiny_config` above is smaller still and fixes every model size here."""
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def tiny_batch(model, num_images: int = 3, texts_per_image=(2, 1, 3), seed: int = 0, size=(32, 32)) -> dict:
    """B images with 1..3 phrases each, tokenised with the model's own byte tokenizer."""
    from sgmodel.encoders import build_tokenizer, tokenize

    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, *size, generator=gen) * 2 - 1
    texts, index = [], []
    for image, count in enumerate(texts_per_image[:num_images]):
        for j in range(count):
            texts.append(PHRASES[(image * 2 + j) % len(PHRASES)])
            index.append(image)
    input_ids, attention_mask = tokenize(build_tokenizer(model.cfg.text), texts, model.cfg.max_text_length)
    return {
        "images": images,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "text_image_index": torch.tensor(index),
        "texts": texts,
        "keys": [f"img{i}" for i in range(num_images)],
    }


def select_images(batch: dict, order: list[int]) -> dict:
    """The same samples with the images in another order (phrases follow their images)."""
    pick = torch.tensor(order)
    new_index_of = {old: new for new, old in enumerate(order)}
    keep = [t for t, img in enumerate(batch["text_image_index"].tolist()) if img in new_index_of]
    keep_t = torch.tensor(keep)
    return {
        "images": batch["images"][pick],
        "input_ids": batch["input_ids"][keep_t],
        "attention_mask": batch["attention_mask"][keep_t],
        "text_image_index": torch.tensor([new_index_of[batch["text_image_index"][t].item()] for t in keep]),
        "texts": [batch["texts"][t] for t in keep],
        "keys": [batch["keys"][i] for i in order],
        "_kept_texts": keep,
    }

"""The speed and recipe switches the demo config uses: each is exact where it claims to be, and does
what its config field says (defaults keep the paper's behaviour)."""

from __future__ import annotations

import pytest
import torch

from sgmodel.encoders import build_image_encoder
from sgmodel.losses import content_words, duplicate_phrase_mask, entailed_phrase_mask
from sgmodel.model import ShatterAndGather
from tests.helpers.tiny_model import tiny_batch, tiny_config


def build(**overrides) -> ShatterAndGather:
    torch.manual_seed(0)
    return ShatterAndGather(tiny_config(**overrides))


@pytest.mark.parametrize("size", [(64, 96), (63, 81)])  # even sizes need the asymmetric TF padding
def test_folded_efficientnet_matches_the_package_layers(size):
    cfg = tiny_config(image_encoder="efficientnet_lite", image_size=size, efficientnet_block=6, freeze_image_encoder=True)
    encoder = build_image_encoder(cfg.image)
    for module in encoder.modules():  # non-trivial BatchNorm statistics, so folding has something to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        folded = encoder(images)  # frozen + no grad: the folded path
    with torch.enable_grad():
        reference = encoder.encode(images)  # autograd on: the package's layers
    assert folded.shape == reference.shape == (2, encoder.grid_size(size)[0] * encoder.grid_size(size)[1], encoder.out_dim)
    assert torch.allclose(folded, reference.detach(), atol=1e-4, rtol=1e-4)


def test_folded_weights_follow_a_loaded_state_dict():
    cfg = tiny_config(image_encoder="efficientnet_lite", image_size=(32, 32), efficientnet_block=2, freeze_image_encoder=True)
    a, b = build_image_encoder(cfg.image, seed=0), build_image_encoder(cfg.image, seed=1)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = a(images)
        a.load_state_dict(b.state_dict())
        after = a(images)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert torch.allclose(after, b(images))


def test_entailed_negatives_drop_images_described_with_the_same_content_words():
    texts = ["the red one", "the blue triangle", "the leftmost object"]
    image_texts = [["the red circle"], ["the triangle that is blue", "the green one"], ["the leftmost shape"], ["the red one"]]
    assert content_words("the only triangle") == {"triangle"}
    assert content_words("the triangle on the far right") == {"triangle"}  # relations compare within an image
    entailed = entailed_phrase_mask(texts, image_texts)
    # "the leftmost object" names nothing but a relation: true of every image, so none is its negative
    assert entailed.tolist() == [[True, False, False, True], [False, True, False, False], [True, True, True, True]]
    # the plain duplicate mask is a subset (it only knows identical phrases)
    plain = duplicate_phrase_mask(texts, image_texts)
    assert (plain & ~entailed).sum() == 0 and plain.sum() < entailed.sum()
    assert torch.equal(duplicate_phrase_mask(texts, image_texts, entailed=True), entailed)


def test_entailed_negatives_change_the_loss_only_when_switched_on():
    batch = tiny_batch(build())
    batch["texts"] = ["red ball", "ball", "square", "red ball", "blue ball", "tree"]
    losses = {}
    for flag in (False, True):
        model = build(drop_duplicate_negatives=True, drop_entailed_negatives=flag)
        model.eval()  # fixed slot noise: the two runs see the same slots
        with torch.no_grad():
            losses[flag] = model(batch)["contrastive"]
    assert not torch.isclose(losses[False], losses[True])


def test_contrastive_warmup_counts_steps_and_survives_the_state_dict():
    model = build(contrastive_warmup_steps=2, contrastive_ramp_steps=2)
    model.train()
    batch = tiny_batch(model)
    weights = []
    for _ in range(5):
        out = model(batch)
        weights.append(float(out["contrastive_weight"]))
        assert torch.allclose(out["loss"].detach(), out["contrastive_weight"] * out["contrastive"] + out["reconstruction"])
    assert weights == [0.0, 0.0, 0.5, 1.0, 1.0]
    again = build(contrastive_warmup_steps=2, contrastive_ramp_steps=2)
    again.load_state_dict(model.state_dict())
    assert int(again.steps_seen) == 5
    assert "steps_seen" not in build().state_dict()  # the paper's default adds nothing to checkpoints


def test_value_position_reaches_the_maps():
    batch = tiny_batch(build())
    plain, placed = build(), build(slot_value_position=True)
    placed.load_state_dict(plain.state_dict())
    a, b = plain.infer(batch), placed.infer(batch)
    assert not torch.allclose(a["maps"], b["maps"])  # same weights, positions now reach the slot vectors


def test_identical_phrases_are_encoded_once_with_the_same_result():
    model = build()
    model.eval()
    batch = tiny_batch(model, texts_per_image=(3, 3, 3))
    calls = []
    model.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    features = model.text_features(batch)  # (T, Ct), duplicates encoded once
    distinct = len(set(batch["texts"]))
    assert calls == [distinct] and distinct < len(batch["texts"])
    direct = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(features, direct, atol=1e-5)

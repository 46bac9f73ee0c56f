"""The assembled ShatterAndGather: losses, gradients, freezing, cached inputs, deterministic inference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sgdata.format.errors import UserError
from sgmodel.encoders import build_tokenizer, tokenize
from sgmodel.model import ShatterAndGather
from tests.helpers.tiny_model import select_images, tiny_batch, tiny_config


def build(**overrides) -> ShatterAndGather:
    torch.manual_seed(0)
    return ShatterAndGather(tiny_config(**overrides))


def test_forward_returns_the_losses():
    model = build()
    out = model(tiny_batch(model))
    assert set(out) >= {"loss", "contrastive", "reconstruction", "accuracy", "logit_scale"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss"].requires_grad
    expected = out["contrastive"] + model.cfg.recon_weight * out["reconstruction"]
    assert torch.allclose(out["loss"].detach(), expected)
    assert 0.0 <= out["accuracy"].item() <= 1.0


def test_gradients_reach_every_trainable_parameter():
    model = build(learn_logit_scale=True, normalize_text=True, logit_scale=10.0)
    model.train()
    model(tiny_batch(model))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert model.log_logit_scale.grad is not None


def test_frozen_encoders_get_no_gradient_and_stay_in_eval_mode():
    model = build(freeze_image_encoder=True, freeze_text_encoder=True)
    model.train()
    assert not model.image_encoder.training and not model.text_encoder.training
    assert model.shatter.training
    model(tiny_batch(model))["loss"].backward()
    for encoder in (model.image_encoder, model.text_encoder):
        assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert model.shatter.input_proj.weight.grad is not None
    names = [g["name"] for g in model.param_groups()]
    assert not any(name.startswith("encoders") for name in names)


def test_infer_is_deterministic_and_independent_of_the_batch():
    model = build(dropout=0.1)
    model.train()  # infer must switch to eval behaviour by itself, and switch back
    batch = tiny_batch(model)
    first = model.infer(batch)
    assert model.training
    again = model.infer(batch)
    assert torch.equal(first["maps"], again["maps"])
    order = [2, 0]  # another batch: fewer images, other order
    other = model.infer(select_images(batch, order))
    kept = select_images(batch, order)["_kept_texts"]
    assert torch.allclose(other["maps"], first["maps"][kept], atol=1e-5)
    assert torch.allclose(other["slot_maps"], first["slot_maps"][order], atol=1e-5)


def test_infer_shapes_and_maps_are_weighted_slot_maps():
    model = build()
    batch = tiny_batch(model)
    out = model.infer(batch)
    t, k = len(batch["texts"]), model.cfg.num_slots
    assert out["maps"].shape == (t, 4, 4)
    assert out["slot_maps"].shape == (3, k, 4, 4)
    assert out["weights"].shape == (t, k)
    assert torch.allclose(out["weights"].sum(-1), torch.ones(t), atol=1e-5)
    assert torch.allclose(out["slot_maps"].sum(1), torch.ones(3, 4, 4), atol=1e-5)
    j = 3
    own = out["slot_maps"][batch["text_image_index"][j]]
    assert torch.allclose(out["maps"][j], (out["weights"][j][:, None, None] * own).sum(0), atol=1e-6)


def test_cached_inputs_give_the_same_losses_as_the_encoders():
    model = build(freeze_image_encoder=True, freeze_text_encoder=True).eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        tokens = model.image_encoder(batch["images"])
        feats = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    cached = {k: v for k, v in batch.items() if k not in ("images", "input_ids", "attention_mask")}
    cached.update(image_tokens=tokens.half(), text_feats=feats)
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = model(cached)
    assert torch.allclose(a["contrastive"], b["contrastive"], atol=1e-2)
    assert torch.allclose(model.infer(batch)["maps"], model.infer(cached)["maps"], atol=1e-2)


def test_standardisation_uses_the_feature_stats():
    model = build(standardize_features=True)
    batch = tiny_batch(model)
    raw = model.image_encoder(batch["images"]).detach()
    assert torch.allclose(model.image_tokens(batch), raw)  # identity until stats are set
    mean, std = raw.mean((0, 1)), raw.std((0, 1))
    model.set_feature_stats(mean, std)
    standardised = model.image_tokens(batch)
    assert torch.allclose(standardised.mean((0, 1)), torch.zeros(32), atol=1e-4)
    assert torch.allclose(standardised.std((0, 1)), torch.ones(32), atol=1e-4)
    assert "feature_mean" in model.state_dict()  # travels with checkpoints
    with pytest.raises(UserError):
        model.set_feature_stats(torch.zeros(5), torch.ones(5))


def test_cached_tokens_of_another_grid_are_refused():
    model = build()
    batch = tiny_batch(model)
    cached = {k: v for k, v in batch.items() if k != "images"}
    cached["image_tokens"] = torch.randn(3, 9, 32)
    with pytest.raises(UserError, match="grid"):
        model(cached)


def test_duplicate_negatives_switch_changes_the_loss():
    batch_texts = (1, 1, 1)
    plain = build(drop_duplicate_negatives=False)
    dedup = build(drop_duplicate_negatives=True)
    batch = tiny_batch(plain, texts_per_image=batch_texts)
    batch["texts"] = ["same phrase"] * 3
    batch["image_texts"] = [["same phrase"], ["same phrase"], ["other"]]
    torch.manual_seed(0)
    loss_plain = plain(batch)["contrastive"]
    torch.manual_seed(0)
    loss_dedup = dedup(batch)["contrastive"]
    assert loss_dedup < loss_plain  # texts 0 and 1 lost one negative each


def test_logit_scale_switches():
    fixed = build(logit_scale=10.0)
    assert math.isclose(fixed.logit_scale().item(), 10.0, rel_tol=1e-6)
    assert "log_logit_scale" not in dict(fixed.named_parameters())
    learned = build(learn_logit_scale=True, logit_scale=10.0)
    assert "log_logit_scale" in dict(learned.named_parameters())
    with pytest.raises(UserError):
        build(logit_scale=0.0)


def test_param_groups_scale_encoder_lr_and_skip_decay_where_it_does_not_belong():
    model = build(lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05)
    groups = {g["name"]: g for g in model.param_groups()}
    assert set(groups) == {"head", "head_no_decay", "encoders", "encoders_no_decay"}
    assert math.isclose(groups["encoders"]["lr"], 1e-4) and math.isclose(groups["head"]["lr"], 1e-3)
    no_decay = {id(p) for name in ("head_no_decay", "encoders_no_decay") for p in groups[name]["params"]}
    named = dict(model.named_parameters())
    for name in ("shatter.slot_mu", "shatter.slot_logvar", "shatter.norm_slots.weight", "shatter.cross_out.bias"):
        assert id(named[name]) in no_decay
    assert id(named["shatter.to_q.weight"]) not in no_decay
    assert id(named["text_encoder.bert.embeddings.word_embeddings.weight"]) in no_decay
    assert id(named["image_encoder.vit.embeddings.position_embeddings"]) in no_decay
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["weight_decay"] == 0.0 for n, g in groups.items() if n.endswith("no_decay"))


def test_tokenize_pads_and_truncates_with_a_warning():
    tokenizer = build_tokenizer(tiny_config().text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenize(tokenizer, ["ab", "abcdef"], max_length=16)
    assert ids.shape == mask.shape == (2, 7)  # 6 bytes + end token
    assert mask.sum(1).tolist() == [3, 7]
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize(tokenizer, ["ab", "x" * 50], max_length=10)
    assert ids.shape == (2, 10) and mask[1].all()
    assert ids[1, -1].item() == tokenizer.eos_token_id  # truncation keeps the end token


def test_negatives_gathered_across_ranks_pad_and_exclude(monkeypatch):
    """Rank 1 of 2 with 3 images; rank 0 has 2 (padded to 3). Collectives are simulated."""
    from sgmodel import distributed

    model = build(gather_negatives=True, drop_duplicate_negatives=True)
    batch = tiny_batch(model)
    other_slots = torch.randn(3, model.cfg.num_slots, model.cfg.dim)

    def fake_all_gather_object(obj):
        return [2, obj] if isinstance(obj, int) else [[["tree"], ["THE red  ball"]], obj]

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_gather_object", fake_all_gather_object)
    monkeypatch.setattr(distributed, "all_gather_with_grad", lambda x: (torch.cat([other_slots, x]), 3))
    slots = torch.randn(3, model.cfg.num_slots, model.cfg.dim)
    gathered, offset, excluded = model._negatives(slots, batch)
    assert gathered.shape[0] == 6 and offset == 3
    assert torch.equal(gathered[3:], slots)
    assert excluded[:, 2].all()  # rank 0's padding row is never a negative
    red = [j for j, t in enumerate(batch["texts"]) if t == "the red ball"]
    assert red and all(excluded[j, 1] for j in red)  # rank 0's image 1 carries the same phrase
    tree = [t == "tree" for t in batch["texts"]]
    assert excluded[:, 0].tolist() == tree  # rank 0's image 0 carries "tree" only
    out = model(batch)  # the whole loss runs with the gathered negatives
    assert torch.isfinite(out["loss"])


def test_mixed_precision_forward_backward_and_float_maps():
    model = build(normalize_text=True, learn_logit_scale=True, gather_query_residual=False)
    batch = tiny_batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        out["loss"].backward()
        maps = model.infer(batch)["maps"]
    assert torch.isfinite(out["loss"]) and maps.dtype == torch.float32
    assert model.shatter.slot_mu.grad is not None

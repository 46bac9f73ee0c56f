"""The method's modules one by one: shapes and the math docs/method.md states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sgmodel.decoder import SpatialBroadcastDecoder
from sgmodel.gather import TextGather
from sgmodel.inference import combine_slot_maps, predict_masks, threshold_maps, upsample_group
from sgmodel.losses import contrastive_loss, duplicate_phrase_mask, reconstruction_loss
from sgmodel.shatter import EntitySlotAttention, compete_for_tokens, sine_position_encoding
from tests.helpers.tiny_model import tiny_config


def make_shatter(**overrides) -> EntitySlotAttention:
    torch.manual_seed(0)
    return EntitySlotAttention(tiny_config(**overrides).slots, in_dim=24).eval()


# ---- shatter ---------------------------------------------------------------------------------------


def test_shatter_shapes_and_maps_partition_each_token():
    shatter = make_shatter(slot_groups=3, slots_per_group=2)
    tokens = torch.randn(2, 12, 24)
    slots, maps = shatter(tokens, (3, 4))
    assert slots.shape == (2, 6, 32)
    assert maps.shape == (2, 6, 12)
    assert torch.allclose(maps.sum(dim=1), torch.ones(2, 12), atol=1e-5)  # softmax ran over slots
    assert (maps >= 0).all()


def test_competition_softmax_over_slots_then_renormalised_over_tokens():
    logits = torch.randn(2, 3, 5, 7) * 3  # (B, H, K, N)
    attn, weights = compete_for_tokens(logits)
    assert torch.allclose(attn.sum(dim=2), torch.ones(2, 3, 7), atol=1e-6)  # each token: sum over slots = 1
    assert torch.allclose(weights.sum(dim=3), torch.ones(2, 3, 5), atol=1e-5)  # each slot: sum over tokens = 1
    # the renormalisation keeps the slot's relative preference between tokens
    ratio = weights[..., 0] / weights[..., 1]
    assert torch.allclose(ratio, attn[..., 0] / attn[..., 1], rtol=1e-4)


def test_group_self_attention_does_not_mix_groups():
    shatter = make_shatter(slot_groups=3, slots_per_group=2)
    x = torch.randn(2, 6, 32)
    base = shatter.group_self_attention(x)
    changed = x.clone()
    changed[:, 0:2] += torch.randn(2, 2, 32)  # group 0 only
    out = shatter.group_self_attention(changed)
    assert not torch.allclose(out[:, 0:2], base[:, 0:2])
    assert torch.allclose(out[:, 2:], base[:, 2:], atol=1e-6)


def test_slots_are_gaussian_samples_and_eval_noise_is_fixed():
    shatter = make_shatter(slot_groups=2, slots_per_group=3)
    a = shatter.initial_slots(4, deterministic=True)
    assert a.shape == (4, 6, 32)
    assert torch.equal(a[0], a[3])  # same noise for every image of the batch
    assert torch.equal(a, make_shatter(slot_groups=2, slots_per_group=3).initial_slots(4, deterministic=True))
    with torch.no_grad():
        shatter.slot_logvar.fill_(-30.0)  # no variance: every sample is the group mean
    b = shatter.initial_slots(2, deterministic=False)
    expected = shatter.slot_mu.repeat_interleave(3, dim=0)  # group-major order
    assert torch.allclose(b[1], expected, atol=1e-5)
    with torch.no_grad():
        shatter.slot_logvar.zero_()
    c, d = shatter.initial_slots(1, False), shatter.initial_slots(1, False)
    assert not torch.equal(c, d)  # training samples fresh noise


def test_position_encoding_goes_to_keys_only():
    shatter = make_shatter()
    tokens = torch.randn(1, 16, 24)
    slots_a, maps_a = shatter(tokens, (4, 4))
    slots_b, maps_b = shatter(tokens, (2, 8))  # same tokens, other layout: only the key positions differ
    assert not torch.allclose(maps_a, maps_b)
    pos = sine_position_encoding((4, 4), 32)
    assert pos.shape == (16, 32)
    assert len({tuple(row.tolist()) for row in pos}) == 16  # every cell has its own code


def test_shatter_rejects_wrong_grid():
    from sgdata.format.errors import UserError

    with pytest.raises(UserError):
        make_shatter()(torch.randn(1, 10, 24), (3, 4))


# ---- gather ----------------------------------------------------------------------------------------


def make_gather(**overrides) -> TextGather:
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    return TextGather(cfg.gather, cfg.slots.dim, cfg.slots.mlp_ratio, cfg.slots.dropout).eval()


def test_gather_all_pairs_shapes_norm_and_weights():
    gather = make_gather()
    text, slots = torch.randn(5, 32), torch.randn(3, 4, 32)
    z, w = gather(text, slots, return_weights=True)
    assert z.shape == (3, 5, 32) and w.shape == (3, 5, 4)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(3, 5), atol=1e-5)
    z_fused, none = gather(text, slots)  # the SDPA path computes the same vectors
    assert none is None
    assert torch.allclose(z_fused, z, atol=1e-5)


def test_gather_own_image_mode_matches_the_pair_diagonal():
    gather = make_gather()
    text, slots = torch.randn(5, 32), torch.randn(3, 4, 32)
    index = torch.tensor([2, 0, 0, 1, 2])
    z_all, w_all = gather(text, slots, return_weights=True)
    z_own, w_own = gather(text, slots, text_image_index=index, return_weights=True)
    assert z_own.shape == (5, 32) and w_own.shape == (5, 4)
    assert torch.allclose(z_own, z_all[index, torch.arange(5)], atol=1e-5)
    assert torch.allclose(w_own, w_all[index, torch.arange(5)], atol=1e-6)


def test_gather_queries_are_independent_and_residual_switch():
    slots = torch.randn(2, 4, 32)
    text = torch.randn(3, 32)
    for residual in (True, False):
        gather = make_gather(gather_query_residual=residual)
        z_three, _ = gather(text, slots)
        z_one, _ = gather(text[1:2], slots)
        assert torch.allclose(z_three[:, 1], z_one[:, 0], atol=1e-5)
    # without the residual z depends on the text only through the attention weights: with a single
    # slot the weights are all 1, so every text gets the same z
    gather = make_gather(gather_query_residual=False)
    z, _ = gather(text, slots[:, :1])
    assert torch.allclose(z[:, 0], z[:, 2], atol=1e-5)
    gather = make_gather(gather_query_residual=True)
    z, _ = gather(text, slots[:, :1])
    assert not torch.allclose(z[:, 0], z[:, 2], atol=1e-3)


# ---- decoder ---------------------------------------------------------------------------------------


def test_decoder_matches_the_materialised_broadcast():
    torch.manual_seed(0)
    cfg = tiny_config(decoder_layers=4)
    decoder = SpatialBroadcastDecoder(cfg.decoder, cfg.slots.dim, feat_dim=10)
    slots = torch.randn(2, 3, 32)
    recon, alphas = decoder(slots, (2, 3))
    assert recon.shape == (2, 6, 10) and alphas.shape == (2, 3, 6)
    assert torch.allclose(alphas.sum(1), torch.ones(2, 6), atol=1e-5)
    # naive: slot broadcast to every position + position embedding, through the MLP at input width
    pos = sine_position_encoding((2, 3), 32)
    first = torch.cat([decoder.slot_in.weight, decoder.pos_in.weight], dim=1)  # acts on [slot, pos]
    x = torch.cat([slots[:, :, None].expand(2, 3, 6, 32), pos.expand(2, 3, 6, 32)], dim=-1)
    h = F.relu(x @ first.T + decoder.slot_in.bias)
    for layer in decoder.hidden:
        h = F.relu(layer(h))
    features = decoder.feature_head(h)  # (B, K, N, C): every slot's own prediction
    a = decoder.alpha_head(h)[..., 0].softmax(dim=1)
    assert torch.allclose(alphas, a, atol=1e-6)
    expected = (a[..., None] * features).sum(1)
    assert torch.allclose(recon, expected, atol=1e-5)


# ---- losses ----------------------------------------------------------------------------------------


def test_contrastive_targets_with_several_texts_per_image():
    text = F.normalize(torch.randn(5, 8), dim=-1)
    index = torch.tensor([0, 0, 1, 2, 2])
    z = torch.zeros(3, 5, 8)
    z[index, torch.arange(5)] = text  # each text's fused vector with its own image is itself
    loss, acc = contrastive_loss(text, z, index, logit_scale=50.0)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    # uniform similarities: chance level ln(B)
    loss, _ = contrastive_loss(text, torch.zeros(3, 5, 8), index, logit_scale=1.0)
    assert math.isclose(loss.item(), math.log(3), rel_tol=1e-6)
    # an offset moves the positives (negatives gathered from other ranks come first)
    z_wide = torch.cat([torch.zeros(2, 5, 8), z])
    loss, acc = contrastive_loss(text, z_wide, index, logit_scale=50.0, image_offset=2)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    # the text side is detached: only z carries the gradient
    text_req = text.clone().requires_grad_(True)
    z_req = z.clone().requires_grad_(True)
    contrastive_loss(text_req, z_req, index, 1.0)[0].backward()
    assert text_req.grad is None and z_req.grad.abs().sum() > 0


def test_contrastive_wrong_image_is_penalised_and_masking_drops_negatives():
    text = F.normalize(torch.randn(2, 8), dim=-1)
    index = torch.tensor([0, 1])
    z = torch.zeros(2, 2, 8)
    z[0, 0] = text[0]
    z[0, 1] = text[1]  # text 1's phrase also fits image 0 (a duplicate), and equally its own image
    z[1, 1] = text[1]
    loss_plain, _ = contrastive_loss(text, z, index, logit_scale=10.0)
    mask = torch.tensor([[False, False], [True, False]])  # image 0 carries text 1's phrase
    loss_masked, acc = contrastive_loss(text, z, index, logit_scale=10.0, same_text_mask=mask)
    assert loss_masked.item() < 1e-3 < loss_plain.item()
    assert acc.item() == 1.0
    # the positive is never masked even if the mask says so
    loss_self, _ = contrastive_loss(text, z, index, 10.0, same_text_mask=torch.ones(2, 2, dtype=torch.bool))
    assert torch.isfinite(loss_self) and loss_self.item() < 1e-6


def test_duplicate_phrase_mask():
    texts = ["The red ball", "tree", "sky"]
    image_texts = [["the  red ball", "tree"], ["sky"], ["the red ball", "cloud"]]
    mask = duplicate_phrase_mask(texts, image_texts)
    expected = torch.tensor([[True, False, True], [True, False, False], [False, True, False]])
    assert torch.equal(mask, expected)


def test_reconstruction_loss_is_mse_to_detached_target():
    recon = torch.randn(2, 4, 3, requires_grad=True)
    target = torch.randn(2, 4, 3, requires_grad=True)
    loss = reconstruction_loss(recon, target)
    assert math.isclose(loss.item(), ((recon - target) ** 2).mean().item(), rel_tol=1e-6)
    loss.backward()
    assert target.grad is None and recon.grad is not None


# ---- inference ------------------------------------------------------------------------------------


def test_mask_inference_from_known_maps_and_weights():
    slot_maps = torch.zeros(2, 3, 2, 2)  # (B, K, h, w)
    slot_maps[0, 0, 0, 0] = 1.0  # image 0, slot 0: top-left
    slot_maps[0, 1, 1, 1] = 1.0  # image 0, slot 1: bottom-right
    slot_maps[1, 2, 0, 1] = 1.0  # image 1, slot 2: top-right
    weights = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    index = torch.tensor([0, 0, 1])
    maps = combine_slot_maps(weights, slot_maps, index)
    assert torch.allclose(maps[0], torch.tensor([[0.9, 0.0], [0.0, 0.1]]))
    assert torch.allclose(maps[2], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    masks = threshold_maps(maps)
    assert masks[0].tolist() == [[True, False], [False, False]]
    assert masks[1].tolist() == [[False, False], [False, True]]
    assert predict_masks(maps, [(2, 2)] * 3)[2].tolist() == [[False, True], [False, False]]  # own size: no resampling
    full = predict_masks(maps, [(4, 4), (6, 2), (4, 4)])
    assert [tuple(m.shape) for m in full] == [(4, 4), (6, 2), (4, 4)]
    assert full[0][0, 0] and not full[0][3, 3]
    assert full[1][5, 1] and not full[1][0, 0]


def test_flat_maps_give_empty_masks():
    maps = torch.stack([torch.full((3, 3), 0.7), torch.arange(9.0).view(3, 3)])
    masks = threshold_maps(maps)
    assert not masks[0].any()
    assert masks[1].sum() == 4  # values 5..8 normalise above 0.5
    assert not predict_masks(maps[:1], [(7, 5)])[0].any()  # still flat once upsampled


def test_predictions_group_by_size_and_keep_order():
    maps = torch.rand(4, 3, 3)
    sizes = [(6, 6), (9, 3), (6, 6), (3, 3)]
    masks = predict_masks(maps, sizes)
    assert [tuple(m.shape) for m in masks] == sizes and masks[0].dtype == torch.bool
    assert torch.equal(masks[3], threshold_maps(maps[3:])[0])  # at its own size the map is not resampled
    one = F.interpolate(maps[2][None, None], size=(6, 6), mode="bilinear", align_corners=False)[0]  # (1, 6, 6)
    assert torch.allclose(upsample_group(maps[2:3], (6, 6)), one, atol=1e-6)
    assert torch.equal(masks[2], threshold_maps(upsample_group(maps[2:3], (6, 6)))[0])

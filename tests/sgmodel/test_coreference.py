"""The co-reference term (docs/training.md, "Relations"): who teaches whom, when it is zero, where it pushes."""

import torch

from sgmodel.losses import coreference_loss, coreference_teachers, relational_phrase
from sgmodel.model import ShatterAndGather
from tests.helpers.tiny_model import tiny_batch, tiny_config


def test_relational_phrases_are_told_by_their_comparison_words():
    assert relational_phrase("the circle on the left") and relational_phrase("The BIGGER star")
    assert relational_phrase("the uppermost box") and relational_phrase("smallest one")
    assert not relational_phrase("the red circle") and not relational_phrase("most of the dog")


def test_attribute_phrases_of_the_same_ref_teach_its_relational_phrases_only():
    texts = ["the red circle", "red circle", "the left circle", "the blue square", "the square on the right", "the bigger one"]
    refs = torch.tensor([0, 0, 0, 1, 1, -1])
    teachers = coreference_teachers(texts, refs)
    expected = torch.zeros(6, 6)
    expected[2, 0] = expected[2, 1] = 0.5  # "the left circle" learns from both attribute phrases of ref 0
    expected[4, 3] = 1.0  # "the square on the right" from "the blue square"
    torch.testing.assert_close(teachers, expected)  # attribute phrases and ref-less ones learn from nobody


def _hard_slot_maps() -> torch.Tensor:
    """Three slots that split 12 tokens cleanly: slot k owns tokens 4k..4k+3. (K, N)"""
    attn = torch.zeros(3, 12)
    for k in range(3):
        attn[k, 4 * k:4 * k + 4] = 1.0
    return attn


def test_the_term_is_zero_when_a_ref_s_phrases_already_agree():
    attn = _hard_slot_maps()
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # teacher and learner both on slot 1
    teachers = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # phrase 1 learns from phrase 0
    loss = coreference_loss(weights @ attn, teachers)
    assert abs(loss.item()) < 1e-6
    disagree = coreference_loss(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ attn, teachers)
    assert disagree.item() > 5


def test_the_term_pushes_a_relational_phrase_toward_its_ref_s_attribute_phrase():
    attn = _hard_slot_maps()
    teacher_weights = torch.tensor([0.1, 0.1, 0.8])  # the attribute phrase picks slot 2
    logits = torch.zeros(3, requires_grad=True)  # the learner starts undecided
    teachers = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    optimizer = torch.optim.SGD([logits], lr=1.0)
    losses = []
    for _ in range(20):
        maps = torch.stack([teacher_weights, logits.softmax(0)]) @ attn  # (2, N)
        loss = coreference_loss(maps, teachers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.argmax().item() == 2 and logits.softmax(0)[2] > 0.8
    assert losses[-1] < 0.1 * losses[0]
    assert teacher_weights.grad is None  # the teacher is never moved by it


def _relational_batch(model, refs):
    batch = tiny_batch(model, num_images=2, texts_per_image=(3, 1))
    batch["texts"] = ["the red ball", "the ball on the left", "the blue one", "tree"]
    from sgmodel.encoders import build_tokenizer, tokenize

    batch["input_ids"], batch["attention_mask"] = tokenize(build_tokenizer(model.cfg.text), batch["texts"], 40)
    batch["text_ref_index"] = torch.tensor(refs)
    return batch


def test_the_term_trains_the_gather_and_text_head_and_is_off_without_ref_groups():
    torch.manual_seed(0)
    model = ShatterAndGather(tiny_config(coreference_weight=1.0, slot_geometry=True, text_word_embedding=True))
    grouped = _relational_batch(model, [0, 0, 1, -1])
    out = model(grouped)
    assert out["coreference"].item() > 0
    model.zero_grad()
    out["loss"].backward()
    with_term = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(0)
    plain = ShatterAndGather(tiny_config(coreference_weight=0.0, slot_geometry=True, text_word_embedding=True))
    plain.load_state_dict(model.state_dict())
    plain.zero_grad()
    plain(grouped)["loss"].backward()
    changed = {n for n, p in plain.named_parameters() if p.grad is not None and not torch.allclose(p.grad, with_term[n], atol=1e-7)}
    assert any(n.startswith("gather.") for n in changed)
    assert "word_embedding.weight" in changed and "gather.geometry.weight" in changed
    assert not any(n.startswith("decoder.") for n in changed)
    # caption shards carry no ref groups: the term is zero and the loss is the plain one
    ungrouped = _relational_batch(model, [-1, -1, -1, -1])
    torch.manual_seed(1)
    a = model(ungrouped)
    torch.manual_seed(1)
    b = plain(ungrouped)
    assert a["coreference"].item() == 0.0
    torch.testing.assert_close(a["loss"], b["loss"])


def test_the_term_waits_for_its_start_step():
    model = ShatterAndGather(tiny_config(coreference_weight=1.0, coreference_start=2))
    batch = _relational_batch(model, [0, 0, 1, -1])
    weights = []
    for _ in range(3):
        out = model(batch)
        weights.append(out["loss"].item() - (out["contrastive"] + out["reconstruction"]).item())
    assert abs(weights[0]) < 1e-5 and abs(weights[1]) < 1e-5
    assert abs(weights[2] - out["coreference"].item()) < 1e-4 and out["coreference"].item() > 0

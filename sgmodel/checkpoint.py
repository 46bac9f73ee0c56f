"""Checkpoints: everything a run needs to continue exactly, written so a crash never costs the last good one.

A checkpoint is one file holding the resolved config, the step and data epoch, model, optimizer and
scheduler state, every RNG state (python, numpy, torch, CUDA), the feature statistics and the sgmodel
version. It is written through sgdata.format's atomic write (a hidden per-process temporary in the
same folder, fsynced and renamed over `<name>`, then the folder fsynced), so readers — and a resumed
run — see either the previous complete file or the new complete file, never a torn one. It is read with `weights_only=True`: a checkpoint
from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sgmodel
from sgdata.format import UserError, atomic_write, remove_temporaries
from sgmodel.config import Config, from_dict, to_dict

FORMAT = "sgmodel-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def rng_states() -> dict[str, Any]:
    """Every generator that training draws from, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    path: str | Path,
    *,
    cfg: Config,
    step: int,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically (see `atomic_torch_save`); the old file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "sgmodel_version": sgmodel.__version__,
        "config": to_dict(cfg),
        "step": int(step),
        "epoch": int(epoch),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states(),
        "feature_stats": None if feature_stats is None else {"mean": feature_stats[0].cpu(), "std": feature_stats[1].cpu()},
        "extra": extra or {},
    }
    remove_temporaries(path)  # what a killed save left: one writer (rank 0), so none is in progress
    atomic_torch_save(state, path)
    return path


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through sgdata.format.atomic_write: a reader (or a crash half-way) sees the old file or
    the new one, never a torn one; writers in separate processes (runs filling one feature cache) never
    mix bytes, as each writes its own temporary."""
    with atomic_write(path, "wb", durable=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors on the CPU), or raise UserError saying in one sentence what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, a pickle that asks for code...
        raise UserError(f"checkpoint {path} cannot be read: it is corrupt, truncated or not a checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an sgmodel checkpoint (no {FORMAT!r} marker)")
    return state


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    """The run's config; checkpoints written before the config had sections hold it flat, and load too."""
    try:
        return from_dict(state["config"])
    except ValueError as exc:
        raise UserError(f"the checkpoint's config does not fit this sgmodel version ({exc})") from None


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Load weights strictly; a shape or name mismatch becomes one sentence, not a wall of tensor names."""
    own = unwrap(model).state_dict()
    saved = state["model"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    resized = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if missing or unexpected or resized:
        if resized:
            k = resized[0]
            example = f"{k} is {tuple(saved[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
        else:
            example = f"{(missing or unexpected)[0]} is {'missing from' if missing else 'unexpected in'} the checkpoint"
        raise UserError(f"{source} does not match the model its config builds ({len(missing) + len(unexpected) + len(resized)} tensors differ; {example})")
    unwrap(model).load_state_dict(saved)
    stats = state.get("feature_stats")
    if stats is not None and hasattr(unwrap(model), "set_feature_stats"):
        unwrap(model).set_feature_stats(stats["mean"], stats["std"])


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The trained network in eval mode, built from the checkpoint's own config (what evaluate and predict use).

    Every weight comes from the checkpoint, frozen encoders included; pretrained encoder folders named
    in the config must still exist locally because the model is built from them first (no downloads).
    """
    from sgmodel.model import ShatterAndGather

    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state)
    model = ShatterAndGather(cfg)
    load_model_state(model, state, f"checkpoint {path}")
    return model.to(device).eval(), cfg, state

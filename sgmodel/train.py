"""Train Shatter-and-Gather on sgdata shards: one process, or every rank of a torchrun job.

    python -m sgmodel.train --config configs/tiny.yaml --train-shards SHARDS --out RUN
    torchrun --nproc_per_node 8 -m sgmodel.train --config configs/refcoco.yaml --train-shards SHARDS --out RUN
    ... --resume                       continue RUN/checkpoint.pt (step, lr schedule, optimizer, RNG, data position)
    ... --max-steps N --checkpoint-every N --any-config-field value

Read top to bottom: setup (process group, config, model, feature cache, data, optimizer, resume) ->
the training loop (forward, NaN guard, backward, clip, step, log, checkpoint). See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sgdata.format import UserError, parse_mixture, write_text_atomic
from sgmodel import distributed as dist
from sgmodel.checkpoint import CHECKPOINT_NAME, config_from_checkpoint, load_checkpoint, load_model_state, restore_rng_states, rng_states, save_checkpoint, unwrap
from sgmodel.config import Config, coerce, describe_fields, flatten, from_dict, load_config, parse_overrides, read_yaml, resumable_fields, write_config
from sgmodel.data import train_data
from sgmodel.logs import configure_logging, current_rank, rank_log_path

logger = logging.getLogger("sgmodel.train")  # not __name__: that is "__main__" under python -m


# ---- setup ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m sgmodel.train",
        description="Train Shatter-and-Gather on sgdata shards (one process, or under torchrun).",
        epilog="Any config field can be set as --field value:\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file with the fields that differ from the paper recipe")
    parser.add_argument("--train-shards", help="directory | glob | brace pattern | comma list; 'a:0.5,b:0.5' mixes shard sets")
    parser.add_argument("--out", required=True, help="run folder: config.yaml, checkpoint.pt, log.jsonl, tensorboard/")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (starts fresh if there is none)")
    parser.add_argument("--max-steps", type=int, help="total optimizer steps (0 = epochs x steps per epoch)")
    parser.add_argument("--checkpoint-every", type=int, help="write OUT/checkpoint.pt every N steps (and at the end)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    for name in ("train_shards", "max_steps", "checkpoint_every"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides["out"] = args.out
    return args, overrides


def resolve_config(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Config, dict | None]:
    """Fresh run: defaults <- YAML <- CLI. Resume: the checkpoint's config, with only resumable fields
    (those whose metadata says `resume`) changed; any other field that differs is refused."""
    checkpoint_path = Path(args.out) / CHECKPOINT_NAME
    if not args.resume or not checkpoint_path.exists():
        if checkpoint_path.exists():
            raise UserError(f"{args.out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        if args.resume and dist.is_main_process():
            logger.info(f"no checkpoint in {args.out} yet: starting a new run")
        cfg = load_config(args.config, overrides)
        if not cfg.data.train_shards:
            raise UserError("no training shards: pass --train-shards (a directory, glob, brace pattern or list)")
        return cfg, None
    state = load_checkpoint(checkpoint_path)
    cfg = config_from_checkpoint(state)
    given = {**read_yaml(args.config), **flatten(overrides)}
    may_change = resumable_fields()
    for name, value in given.items():
        value = coerce(name, value)
        if name not in may_change and value != getattr(cfg, name):
            raise UserError(
                f"--resume continues the checkpoint's run, whose {name} is {getattr(cfg, name)!r}, not {value!r}; "
                f"drop that option or start a new run in another --out"
            )
    return from_dict({name: value for name, value in given.items() if name in may_change}, base=cfg), state


def configure_threads(on_cuda: bool) -> None:
    """CPU ranks on one machine share its cores: unless OMP_NUM_THREADS says otherwise, split them evenly."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if on_cuda or "OMP_NUM_THREADS" in os.environ or local_world <= 1:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total` (multiplies each group's lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLog:
    """RUN/log.jsonl (one JSON object per logged step) and TensorBoard events, written by rank 0 only.

    On resume, lines after the checkpoint's step (written before a crash) are dropped and TensorBoard
    purges its events after that step, so the history continues with no gap and no repeat.
    """

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.path = out / "log.jsonl"
        if start_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step > 0 else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; inf for a line a kill cut short (it is dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def log_record(step: int, epoch: int, outputs: dict, lr: float, grad_norm: torch.Tensor, samples_per_s: float, skipped: bool) -> dict[str, Any]:
    """One log.jsonl line: the losses averaged over ranks (a collective: every rank calls this on the same steps)."""
    names = ("loss", "contrastive", "reconstruction", "accuracy") + (("coreference",) if "coreference" in outputs else ())
    values = dist.all_reduce_mean(torch.stack([outputs[n].detach().float() for n in names])).tolist()
    record = {"step": step, "epoch": epoch, **{n: _finite_or_none(v) for n, v in zip(names, values)}, "lr": lr,
              "grad_norm": _finite_or_none(float(grad_norm)), "samples_per_s": round(samples_per_s, 3)}
    if "logit_scale" in outputs:
        record["logit_scale"] = float(outputs["logit_scale"])
    if skipped:
        record["skipped"] = True
        if dist.is_main_process():
            logger.warning(f"step {step}: non-finite loss or gradient, update skipped (nan_policy=skip)")
    return record


def skipped_record(step: int, epoch: int, count: int) -> dict[str, Any]:
    """The log line of a skipped step found after the fact (flags are read at log steps only)."""
    if dist.is_main_process():
        logger.warning(f"step {step}: non-finite loss or gradient, update skipped (nan_policy=skip); {count} such step(s) since the last log line")
    return {"step": step, "epoch": epoch, "loss": None, "contrastive": None, "reconstruction": None, "accuracy": None,
            "skipped": True, "skipped_steps": count}


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups, fused when every parameter allows it.

    The fused kernel updates all tensors in one pass; the default per-tensor loop dominated the
    paper-size step on CPU (docs/benchmarks.md). Fused and unfused give the same update rule.
    """
    groups = model.param_groups()
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def precision_context(device: torch.device, precision: str):
    """The autocast the step runs under: bf16 on a GPU when `precision` is bf16, else fp32 (nothing).

    `precision` is the config's, already one of its choices (sgmodel.config checks them when a config
    is built). A CPU always trains in fp32: few CPUs have fast bf16 matrix units, and fp32 there costs
    no memory that matters. The bf16 path itself is checked on the CPU by tests/sgmodel/test_precision.py,
    which runs `train_step` under torch.autocast("cpu", torch.bfloat16) against fp32.
    """
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on its device; on a GPU the image encoder's convolutions hold NHWC (channels-last) weights.

    cuDNN's bf16 convolutions are fastest in NHWC, and a convolution whose weight is channels-last
    gives channels-last outputs, so the whole CNN encoder runs in that layout without touching the
    images. Only 4-D weights change layout; the parameters stay the same objects.
    """
    model = model.to(device)
    if device.type == "cuda":
        model.image_encoder.to(memory_format=torch.channels_last)
    return model


def train_step(model, optimizer: torch.optim.Optimizer, batch: dict[str, Any], trainable: list, grad_clip: float,
               autocast) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One optimizer step that never waits for the device: returns (outputs, grad_norm, bad).

    bad: a 0-dim float tensor on the device, 1.0 when the loss or the gradient norm is NaN or infinite
    on any rank. Such a step changes no weight, and the host need not look: the fused AdamW kernel
    takes `bad` as its found-inf flag (the way GradScaler skips steps) and skips the update on the
    device. The trainer reads the flags only at log and checkpoint steps. The backward pass runs even
    for a bad step, so every rank runs the same collectives.
    """
    with autocast:
        outputs = model(batch)
    loss = outputs["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
    bad = dist.all_reduce_max(bad)  # the norm is of all-reduced gradients, the loss is per rank
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad  # read by the fused kernel: a flagged step updates nothing
        optimizer.step()
    elif not bool(bad):  # an unfused optimizer cannot skip on the device: here the host waits
        optimizer.step()
    return outputs, grad_norm, bad


def write_checkpoint(out: Path, cfg: Config, step: int, steps_per_epoch: int, model, optimizer, scheduler, stats) -> None:
    """Every rank hands in its RNG state (so each resumes its own stream); rank 0 writes the file."""
    per_rank = dist.all_gather_object(rng_states())
    if dist.is_main_process():
        save_checkpoint(
            out / CHECKPOINT_NAME, cfg=cfg, step=step, epoch=step // steps_per_epoch, model=model, optimizer=optimizer,
            scheduler=scheduler, feature_stats=stats, extra={"rng_per_rank": per_rank, "steps_per_epoch": steps_per_epoch},
        )


# ---- the run -------------------------------------------------------------------------------------


def train(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    device = dist.init()
    on_cuda = device.type == "cuda"
    configure_threads(on_cuda)
    rank, world, main = dist.get_rank(), dist.get_world_size(), dist.is_main_process()
    cfg, resumed = resolve_config(args, overrides)
    out = Path(cfg.run.out)
    if cfg.run.rank_logs:
        configure_logging(rank, rank_file=rank_log_path(out, rank))
    if main:
        write_config(cfg, out / "config.yaml")

    # model: identical initial weights on every rank, then a per-rank stream for dropout and slot noise
    from sgmodel.encoders import build_tokenizer
    from sgmodel.features import ensure_feature_cache
    from sgmodel.model import ShatterAndGather

    seed_everything(cfg.run.seed)
    tokenizer = build_tokenizer(cfg.text)
    model = place_model(ShatterAndGather(cfg, tokenizer), device)

    # frozen encoders: features once per sample, standardisation statistics into the model
    urls = [u for part, _ in parse_mixture(cfg.data.train_shards) for u in part]
    features = ensure_feature_cache(model, cfg, urls, device, tokenizer)
    stats = features.stats() if features is not None else None
    if stats is not None:
        model.set_feature_stats(stats[0].to(device), stats[1].to(device))
    if resumed is not None:
        load_model_state(model, resumed, f"checkpoint {out / CHECKPOINT_NAME}")
    seed_everything(cfg.run.seed + rank)
    if cfg.run.compile:  # before the DDP wrapper, which then calls the compiled stages
        model.compile_stages()

    if dist.is_enabled():
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if on_cuda else None,
            # every trainable parameter takes part in each step (frozen encoders have none; the model
            # builds no decoder when recon_weight is 0), so DDP need not search for unused ones
            find_unused_parameters=False,
        )

    data = train_data(cfg, tokenizer, rank, world, features, on_cuda)
    max_steps = cfg.optim.max_steps or cfg.optim.epochs * data.steps_per_epoch
    optimizer = make_optimizer(unwrap(model), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, max_steps))
    step = 0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        per_rank = resumed["extra"].get("rng_per_rank") or []
        if len(per_rank) == world:
            restore_rng_states(per_rank[rank])
        step = resumed["step"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = precision_context(device, cfg.optim.precision)
    log = RunLog(out, step, main)
    if main:
        logger.info(f"training {max_steps} steps ({data.steps_per_epoch} per epoch, {data.samples} samples, {world} rank(s) x {cfg.optim.batch_size} images) "
                    f"from step {step} on {device} ({dist.backend_name()}, {'bf16' if isinstance(autocast, torch.autocast) else 'fp32'}) -> {out}")
    progress = tqdm(total=max_steps, initial=step, disable=not main, desc="train", unit="step", dynamic_ncols=True)
    last_saved, timer, images_since = step, time.time(), 0
    model.train()

    # ---- the loop --------------------------------------------------------------------------------
    # Non-finite steps are counted on the device (bad_steps, and the first one's step number) and read
    # at log and checkpoint steps only: no step waits for the GPU. A flagged step updated nothing.
    bad_steps = torch.zeros((), device=device)
    first_bad = torch.full((), -1.0, device=device)
    try:
        while step < max_steps:
            epoch = step // data.steps_per_epoch
            for batch in data.epoch_batches(epoch, start=step % data.steps_per_epoch):
                batch = to_device(batch, device)
                lr = max(scheduler.get_last_lr())
                outputs, grad_norm, bad = train_step(model, optimizer, batch, trainable, cfg.optim.grad_clip, autocast)
                scheduler.step()
                step += 1
                bad_steps += bad
                first_bad = torch.where((first_bad < 0) & (bad > 0), float(step), first_bad)
                images_since += len(batch["keys"]) * world
                progress.update(1)

                log_now = step % cfg.run.log_every == 0 or step == max_steps
                save_now = step % cfg.run.checkpoint_every == 0 or step == max_steps
                if not (log_now or save_now):
                    continue
                flagged, first, this_bad = (int(v) for v in torch.stack([bad_steps, first_bad, bad]).tolist())
                if flagged:
                    if cfg.run.nan_policy == "stop":
                        raise UserError(_stopped_message(first, last_saved, out))
                    if first != step:  # an earlier skipped step gets its own line; this step's goes below
                        log.write(skipped_record(first, epoch, flagged - this_bad))
                    bad_steps.zero_()
                    first_bad.fill_(-1.0)
                if log_now or this_bad:
                    record = log_record(step, epoch, outputs, lr, grad_norm, images_since / max(time.time() - timer, 1e-9), bool(this_bad))
                    log.write(record)
                    progress.set_postfix(loss=f"{record['loss']}"[:7], lr=f"{lr:.2e}")
                    timer, images_since = time.time(), 0
                if save_now:
                    write_checkpoint(out, cfg, step, data.steps_per_epoch, model, optimizer, scheduler, stats)
                    last_saved = step
                if step >= max_steps:
                    break
    finally:  # also when a NaN stops the run: the log keeps every line written
        progress.close()
        log.close()
    if main:
        logger.info(f"done: step {step}, checkpoint {out / CHECKPOINT_NAME}")
    return 0


def _stopped_message(step: int, last_saved: int, out: Path) -> str:
    kept = f"{out / CHECKPOINT_NAME} still holds step {last_saved}" if last_saved > 0 else "no checkpoint had been written yet"
    return (f"the loss or gradient norm became NaN or infinite at step {step}, so training stopped (that step and any "
            f"after it updated no weight) and {kept} (lower --lr, or pass --nan-policy skip to skip such steps)")


def main(argv: list[str] | None = None) -> int:
    configure_logging()  # rank 0 speaks; with rank_logs every rank also writes RUN/logs/rank-<r>.log
    try:
        return train(argv)
    except UserError as exc:
        rank = current_rank()
        prefix = f"rank {rank}: " if rank > 0 else ""
        logger.error(f"error: {prefix}{exc}")
        return 2
    finally:
        dist.shutdown()
        configure_logging()  # closes a rank_logs file


if __name__ == "__main__":
    sys.exit(main())

"""Training step: samples/s and peak memory of a full step, sgmodel against the eager baseline (baseline_sag.py).

A step is what the trainer does per batch: forward, both losses, backward, gradient-norm clipping at
0.1, AdamW with the encoder/head parameter groups. Random weights; random normalised images and token
ids; one phrase per image (the public code's sample is one (image, phrase) pair, so samples/s compare).

- paper: the paper's configuration (sgmodel.config defaults: ViT-S/16 at 384x384, a BERT-base-sized
  text encoder with the 30,522-token WordPiece vocabulary, 18x2 = 36 slots, 6 iterations, width 512,
  4-layer reconstruction decoder), batch 8 on CPU;
- tiny: configs/tiny.yaml, batch 8, with the trainer's `compile: true` (`ShatterAndGather.compile_stages`):
  at this size per-operation overhead is most of a step, which is what compiling removes. The eager
  sgmodel step is timed beside it (`eager_*` in the results). The paper configuration runs eager: its
  time is matrix products, and its compile would cost more than a quick run has.
Memory: each (configuration, implementation) runs in a fresh child process that reports its peak
resident memory over the timed steps (VmHWM, restarted after the warm-up steps, so one-off costs such
as compiling are not counted; model, optimizer state, activations and the interpreter are; both sides
import the same libraries, so the difference is the implementation's). The whole process's peak is
recorded too (`process_peak_rss_gb`).
Speed: in full mode one child builds both sides and interleaves their steps (A B, B A, ...), so load
drift on a shared machine hits both alike; each side's figure is its median step. `--quick` takes the
paper configuration's times from the memory children instead (one step, no warm-up, so it finishes in
minutes; the noisiest figure of a quick run).
Before any timing, the baseline is checked to compute sgmodel's loss from the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from benchmarks.common import ROOT, current_rss_bytes, median, peak_rss_bytes, reset_peak_rss, result, run_child

PUBLIC_CODE = {"samples_per_s": 0.47, "peak_rss_gb": 7.0, "batch": 8,
               "note": "public implementation, measured earlier on this machine kind (docs/benchmarks.md)"}
CONFIGS = {
    # name: (config file or None for the paper defaults, vocabulary size, tokens per phrase, batch, compiled)
    "paper": (None, 30522, 12, 8, False),
    "tiny": ("configs/tiny.yaml", 384, 24, 8, True),
}


def load(name: str):
    from sgmodel.config import load_config

    path, vocab, length, batch, _ = CONFIGS[name]
    return load_config(ROOT / path if path else None), vocab, length, batch


def make_batch(cfg, vocab: int, length: int, batch: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    height, width = cfg.image_size
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[::2, length * 2 // 3:] = 0  # every other phrase is shorter: padding is exercised
    return {
        "images": torch.rand(batch, 3, height, width, generator=g) * 2 - 1,  # (B, 3, H, W) in [-1, 1]
        "input_ids": torch.randint(1, vocab, (batch, length), generator=g),  # (T, L), T = B
        "attention_mask": mask,
        "text_image_index": torch.arange(batch),
        "texts": [f"phrase {i}" for i in range(batch)],
        "keys": [f"img{i}" for i in range(batch)],
    }


def build(impl: str, name: str):
    """(model, optimizer, trainable parameters, batch, config) of one side, in train mode.

    impl: "sgmodel" (compiled where the configuration says so, as `compile: true` trains),
    "sgmodel-eager", or "baseline".
    """
    import torch

    from benchmarks.baseline_sag import BaselineSaG, VocabOnly
    from sgmodel.model import ShatterAndGather

    cfg, vocab, length, batch_size = load(name)
    torch.manual_seed(0)
    if impl == "baseline":
        model = BaselineSaG(cfg, vocab)
    else:
        model = ShatterAndGather(cfg, tokenizer=VocabOnly(vocab))
        if impl == "sgmodel" and CONFIGS[name][4]:
            model.compile_stages()  # compiled on its first step (a warm-up step)
    model.train()
    optimizer = make_optimizer(impl, model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, params, make_batch(cfg, vocab, length, batch_size), cfg


def make_optimizer(impl: str, model, cfg):
    """sgmodel: the trainer's own optimizer (sgmodel.train.make_optimizer when it exists, else the AdamW
    train.py builds inline); baseline: plain AdamW with the same groups, as the public code runs it."""
    import torch

    if impl.startswith("sgmodel"):
        import sgmodel.train

        factory = getattr(sgmodel.train, "make_optimizer", None)
        if factory is not None:
            return factory(model, cfg)
    return torch.optim.AdamW(model.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model, optimizer, params, batch, cfg) -> tuple[float, float, float]:
    """One full step as the trainer runs it; returns (wall seconds, CPU seconds of all threads, loss)."""
    import torch

    cpu, start = time.process_time(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return time.perf_counter() - start, time.process_time() - cpu, float(loss.detach())


def _prepare_process() -> None:
    """Same threads and same imported libraries on both sides (RSS then compares the implementations)."""
    import torch
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.vit.modeling_vit  # noqa: F401

    import benchmarks.baseline_sag  # noqa: F401
    import sgmodel.model  # noqa: F401

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))


def child(impl: str, name: str, warmup: int, steps: int) -> dict[str, Any]:
    """In a fresh process: one side's warm-up + timed steps, and the peak RSS of the timed steps."""
    _prepare_process()
    rss_imports = peak_rss_bytes()
    side = build(impl, name)
    rss_built = peak_rss_bytes()
    runs = [train_step(*side) for _ in range(warmup)]
    warm_peak = peak_rss_bytes()  # the whole process so far: imports, build, warm-up (and compiling)
    restarted = reset_peak_rss()
    resting = current_rss_bytes()  # what the process holds between steps: libraries, weights, optimizer state
    runs += [train_step(*side) for _ in range(steps)]
    times = [t for t, _, _ in runs[warmup:]]
    return {
        "impl": impl, "config": name, "batch": len(side[3]["keys"]), "step_s": median(times),
        "step_times": [round(t, 3) for t in times], "step_cpu_s": median([c for _, c, _ in runs[warmup:]]),
        "first_step_s": runs[0][0], "peak_rss_bytes": peak_rss_bytes(), "peak_is_of_timed_steps": restarted,
        "resting_rss_bytes": resting, "step_growth_bytes": peak_rss_bytes() - resting if restarted else None,
        "process_peak_rss_bytes": max(peak_rss_bytes(), warm_peak), "rss_after_imports_bytes": rss_imports,
        "rss_after_build_bytes": rss_built, "parameters": sum(p.numel() for p in side[2]),
        "finite": all(math.isfinite(l) for _, _, l in runs),
    }


def child_alternating(name: str, warmup: int, steps: int) -> dict[str, Any]:
    """In one process: every side built, then their steps interleaved (A B C, C B A, ...), so load drift hits all alike."""
    _prepare_process()
    impls = ("sgmodel", "baseline", "sgmodel-eager") if CONFIGS[name][4] else ("sgmodel", "baseline")
    sides = {impl: build(impl, name) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in sides}
    cpus: dict[str, list[float]] = {impl: [] for impl in sides}
    finite = True
    for impl in sides:
        for _ in range(warmup):
            finite &= math.isfinite(train_step(*sides[impl])[2])
    for i in range(steps):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            seconds, cpu, loss = train_step(*sides[impl])
            times[impl].append(seconds)
            cpus[impl].append(cpu)
            finite &= math.isfinite(loss)
    return {"config": name, "step_s": {k: median(v) for k, v in times.items()},
            "step_cpu_s": {k: median(v) for k, v in cpus.items()},
            "step_times": {k: [round(t, 3) for t in v] for k, v in times.items()}, "finite": finite}


def measure(name: str, quick: bool) -> dict[str, Any]:
    """Memory from one fresh child per side; time from a child that interleaves the two sides' steps,
    except for the paper configuration in quick mode, whose time comes from the memory children."""
    warmup, steps, timeout = {("paper", True): (0, 1, 600), ("paper", False): (1, 1, 900),
                              ("tiny", True): (2, 10, 300), ("tiny", False): (3, 20, 300)}[(name, quick)]
    alone: dict[str, dict[str, Any]] = {}
    for impl in ("sgmodel", "baseline"):
        alone[impl] = run_child("benchmarks.bench_train_step", ["--child", impl, name, str(warmup), str(steps)], timeout)
    timing = {"step_s": {impl: alone[impl]["step_s"] for impl in alone}, "how": "one child per side",
              "step_cpu_s": {impl: alone[impl]["step_cpu_s"] for impl in alone},
              "step_times": {impl: alone[impl]["step_times"] for impl in alone}}
    if name == "tiny" or not quick:  # tiny interleaves in quick mode too: it costs seconds
        pairs = {("paper", False): 3, ("tiny", False): 30, ("tiny", True): 10}[(name, quick)]
        inter = run_child("benchmarks.bench_train_step", ["--alternate", name, "1", str(pairs)], 2 * timeout)
        if not inter["finite"]:
            raise RuntimeError(f"a non-finite loss at {name}")
        timing = {"step_s": inter["step_s"], "how": "both sides in one child, steps interleaved",
                  "step_cpu_s": inter["step_cpu_s"], "step_times": inter["step_times"]}
    for impl, out in alone.items():
        if not out["finite"]:
            raise RuntimeError(f"{impl} at {name} produced a non-finite loss")
    return {"alone": alone, "timing": timing, "warmup": warmup}


def check_baseline() -> float:
    """The baseline computes sgmodel's loss on the tiny configuration (same weights, dropout off)."""
    import torch

    from benchmarks.baseline_sag import check_equivalence

    cfg, vocab, length, _ = load("tiny")
    batch = make_batch(cfg, vocab, length, 3, seed=1)
    batch["text_image_index"] = torch.tensor([0, 1, 2])
    ours, _ = check_equivalence(cfg, vocab, batch)
    return ours


def run(quick: bool) -> dict[str, dict[str, Any]]:
    check_baseline()
    results = {}
    for name in ("tiny", "paper"):
        m = measure(name, quick)
        alone, timing = m["alone"], m["timing"]
        batch = alone["sgmodel"]["batch"]
        ours_rss, base_rss = alone["sgmodel"]["peak_rss_bytes"], alone["baseline"]["peak_rss_bytes"]
        ours_sps, base_sps = batch / timing["step_s"]["sgmodel"], batch / timing["step_s"]["baseline"]
        extra = {
            "batch": batch,
            "phrases_per_image": 1,
            "timing": timing["how"],
            "warmup_steps": m["warmup"],
            "step_s": {k: round(v, 3) for k, v in timing["step_s"].items()},
            # CPU seconds of all threads per step: a second view, less moved by other processes' load
            "step_cpu_s": {k: round(v, 3) for k, v in timing["step_cpu_s"].items()},
            "cpu_time_ratio": round(timing["step_cpu_s"]["baseline"] / timing["step_cpu_s"]["sgmodel"], 3),
            "step_times": timing["step_times"],
            "peak_rss_gb": {"sgmodel": round(ours_rss / 1e9, 3), "baseline": round(base_rss / 1e9, 3)},
            "memory_ratio_baseline_over_ours": round(base_rss / ours_rss, 3),
            "memory_measured_over": "timed steps" if all(v["peak_is_of_timed_steps"] for v in alone.values())
            else "whole process",
            "process_peak_rss_gb": {k: round(v["process_peak_rss_bytes"] / 1e9, 3) for k, v in alone.items()},
            # what the timed steps hold between steps, and what they allocate above that at their peak
            "resting_rss_gb": {k: round(v["resting_rss_bytes"] / 1e9, 3) for k, v in alone.items()},
            "step_growth_gb": {k: round(v["step_growth_bytes"] / 1e9, 3) if v["step_growth_bytes"] is not None
                               else None for k, v in alone.items()},
            "first_step_s": {k: round(v["first_step_s"], 2) for k, v in alone.items()},  # compiling, for sgmodel
            "compiled": CONFIGS[name][4],
            "rss_after_imports_gb": {k: round(v["rss_after_imports_bytes"] / 1e9, 3) for k, v in alone.items()},
            "rss_after_build_gb": {k: round(v["rss_after_build_bytes"] / 1e9, 3) for k, v in alone.items()},
            "parameters": alone["sgmodel"]["parameters"],
            "threads": int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)),
            "device": "cpu",
        }
        if "sgmodel-eager" in timing["step_s"]:  # the same model without compiling, timed beside the others
            eager_sps = batch / timing["step_s"]["sgmodel-eager"]
            extra["eager_samples_per_s"] = round(eager_sps, 4)
            extra["eager_ratio"] = round(eager_sps / base_sps, 3)
        if name == "paper":
            extra["public_code"] = PUBLIC_CODE
            # Not side by side (it ran on a free machine): the estimate assumes the baseline, which computes
            # the public code's math its way, would run at the public code's speed there.
            extra["public_code_scaled_estimate_samples_per_s"] = round(ours_sps / base_sps * PUBLIC_CODE["samples_per_s"], 3)
        key = f"train_step_{name}"
        results[key] = result(key, round(ours_sps, 4), round(base_sps, 4), "samples/s", **extra)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "CONFIG", "WARMUP", "STEPS"))
    parser.add_argument("--alternate", nargs=3, metavar=("CONFIG", "WARMUP", "STEPS"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.alternate:
        name, warmup, steps = args.alternate
        print(json.dumps(child_alternating(name, int(warmup), int(steps))))
    elif args.child:
        impl, name, warmup, steps = args.child
        print(json.dumps(child(impl, name, int(warmup), int(steps))))
    else:
        print(json.dumps(run(args.quick), indent=1))

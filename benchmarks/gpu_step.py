"""GPU training step: sgmodel beside the public implementation, and the streaming loader against the step.

    python -m benchmarks.gpu_step --public-sag DIR [--batches 32,64] [--steps 20] [--results benchmarks/results.json]
    python -m benchmarks.gpu_step --cpu-smoke --public-sag FAKE_DIR --results OUT.json   (the plumbing, on a CPU)

One full training step of the paper configuration (ViT-S/16 at 384x384, a BERT-base-sized text encoder,
36 slots, 6 iterations, d = 512, the 4-layer reconstruction decoder): forward, both losses, backward,
gradient-norm clipping at 0.1, AdamW. Random weights on both sides, one phrase per image (the public
code's sample is one (image, phrase) pair, so samples/s compare), the batch already on the GPU.
- sgmodel: the trainer's own `train_step` (sgmodel.train): bf16 autocast, both training stages compiled
  (`ShatterAndGather.compile_stages`, one static graph per batch size), fused AdamW that skips a
  non-finite step on the device, channels-last convolution weights, no host-device sync in the step.
- public: the public implementation's own modules from a local checkout (`--public-sag DIR`; see
  benchmarks/public_sag.py for the shims), its published recipe: fp16 autocast with a GradScaler.
Each side runs in a fresh child process (its own peak memory and its own compile caches). Per batch
size: warm-up steps (sgmodel compiles in the first), then timed steps between two device syncs;
samples/s = batch x steps / seconds. Peak memory: torch.cuda.max_memory_allocated over the timed steps
(weights, optimizer state, activations); the peak including compiling is recorded too. FLOPs: one eager
forward + backward under torch.utils.flop_counter (before compiling); TFLOP/s = FLOPs / step seconds,
set against the device's dense bf16 peak (PEAK_DENSE_BF16_TFLOPS; the public side runs fp16, whose
dense peak is the same on these devices). The host syncs one step makes are counted under
torch.cuda.set_sync_debug_mode("warn") after the timing.
The loader: sgmodel's streaming loader at 384x384 on this machine's cores with pinned batches,
persistent workers and prefetch (the trainer's GPU settings), in samples/s against what the sgmodel
step consumes at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, WORK, fmt, median, peak_rss_bytes, result, run_child

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first name that
# occurs in torch.cuda.get_device_name() wins, so the specific names come before the general ones.
PEAK_DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),  # H100 SXM
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)
SMOKE_PUBLIC_FLAGS = ["--crop_size", "64", "--embed_dim", "32", "--agg_input_dim", "32", "--agg_query_dim", "32"]
SMOKE_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, None for a device not in the table (the fraction is then not given)."""
    for name, peak in PEAK_DENSE_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


# ---- the two sides -----------------------------------------------------------------------------------


class SgmodelSide:
    """The trainer's model, optimizer, schedule and step on `device` (sgmodel.train's own functions)."""

    def __init__(self, config: str, device, compile_mode: str | None):
        import torch

        from benchmarks.baseline_sag import VocabOnly
        from benchmarks.bench_train_step import load
        from sgmodel.model import ShatterAndGather
        from sgmodel.train import lr_factor, make_optimizer, place_model, precision_context

        self.cfg, self.vocab, self.length, _ = load(config)
        torch.manual_seed(0)
        self.model = place_model(ShatterAndGather(self.cfg, tokenizer=VocabOnly(self.vocab)), device).train()
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.cfg.optim.warmup_steps, 100000))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = precision_context(device, self.cfg.optim.precision)
        self.device, self.compile_mode = device, compile_mode

    def compile(self) -> None:
        if self.compile_mode is not None:
            self.model.compile_stages(mode=self.compile_mode, dynamic=False)

    def batch(self, images, input_ids, attention_mask) -> dict[str, Any]:
        import torch

        from sgmodel.train import to_device

        b = images.shape[0]
        return to_device({"images": images, "input_ids": input_ids, "attention_mask": attention_mask,
                          "text_image_index": torch.arange(b), "texts": [f"phrase {i}" for i in range(b)],
                          "keys": [f"img{i}" for i in range(b)]}, self.device)

    def forward_loss(self, batch):
        with self.autocast:
            return self.model(batch)["loss"]

    def step(self, batch):
        from sgmodel.train import train_step

        outputs, _, _ = train_step(self.model, self.optimizer, batch, self.trainable, self.cfg.optim.grad_clip, self.autocast)
        self.scheduler.step()
        return outputs["loss"].detach()


def public_side(checkout: str, device, smoke: bool):
    from benchmarks.public_sag import PublicSide

    return PublicSide(checkout, device, SMOKE_PUBLIC_FLAGS if smoke else None, SMOKE_BERT if smoke else None)


def random_inputs(cfg, vocab: int, length: int, batch: int):
    """uint8 images (B, 3, H, W) as the loader hands them, token ids and masks (B, L): one phrase per image."""
    import torch

    from benchmarks.bench_train_step import make_batch

    made = make_batch(cfg, vocab, length, batch)
    images = ((made["images"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images, made["input_ids"], made["attention_mask"]


# ---- measuring one side ------------------------------------------------------------------------------


def count_flops(side, batch) -> int:
    """FLOPs of one eager forward + backward (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        side.forward_loss(batch).backward()
    for p in side.model.parameters():
        p.grad = None
    return counter.get_total_flops()


def syncs_in_one_step(side, batch) -> int | None:
    """How many times one step makes the host wait for the GPU (torch.cuda's sync debug mode); None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            side.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(side, batch, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = time.perf_counter()
    losses = [side.step(batch) for _ in range(max(1, warmup))]
    sync()
    warm_s = time.perf_counter() - first
    process_peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [side.step(batch) for _ in range(steps)]
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    finite = bool(torch.isfinite(torch.stack([l.float() for l in losses])).all())
    return {"step_s": seconds / steps, "warmup_s": round(warm_s, 2), "peak_bytes": peak, "process_peak_bytes": max(peak, process_peak),
            "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None, "finite": finite}


def child(impl: str, batches: list[int], warmup: int, steps: int, public_sag: str | None, smoke: bool,
          compile_mode: str) -> dict[str, Any]:
    """In a fresh process: one side at every batch size."""
    import torch

    from benchmarks.bench_train_step import load

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    config = "tiny" if smoke else "paper"
    cfg, vocab, length, _ = load(config)
    side = SgmodelSide(config, device, None if compile_mode == "none" else compile_mode) if impl == "sgmodel" \
        else public_side(public_sag, device, smoke)
    out: dict[str, Any] = {"impl": impl, "device": str(device), "rows": {}}
    for b in batches:
        batch = side.batch(*random_inputs(cfg, vocab, length, b))
        flops = count_flops(side, batch)
        if impl == "sgmodel" and b == batches[0]:
            side.compile()
        measured = measure(side, batch, warmup, steps)
        measured.update(flops=flops, syncs_per_step=syncs_in_one_step(side, batch),
                        parameters=sum(p.numel() for p in side.model.parameters() if p.requires_grad))
        out["rows"][str(b)] = measured
    return out


# ---- the loader --------------------------------------------------------------------------------------


def loader_child(workers: int, batch: int, batches: int, images: int, on_cuda: bool) -> dict[str, Any]:
    """sgmodel's training loader at 384x384 on a fresh build of synthetic 640x480 JPEGs (the loader benchmark's input)."""
    from benchmarks.bench_build import SHARD_SIZE, build_once, make_source
    from benchmarks.bench_loader import loader_rate

    source = make_source(images)
    out = WORK / f"gpu-loader-build-{images}"
    if not (out / "dataset.json").is_file():
        build_once(source, out, workers=0, max_size=None)
    shards = len(list((out / "train").glob("*.tar")))
    rate = loader_rate(str(out / "train"), batches, workers=workers, batch=batch, on_cuda=on_cuda)
    return {**rate, "workers": workers, "batch": batch, "shards": shards, "shard_size": SHARD_SIZE, "pinned": on_cuda}


# ---- the run -----------------------------------------------------------------------------------------


def device_facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
            "peak_dense_bf16_tflops": peak_tflops(name) if cuda else None}


def rows_from(ours: dict, public: dict, facts: dict, public_commit: str | None, steps: int, compile_mode: str) -> dict[str, dict]:
    rows = {}
    peak = facts["peak_dense_bf16_tflops"]
    for b, mine in ours["rows"].items():
        theirs = public["rows"][b]
        sides = {"sgmodel": mine, "public": theirs}
        sps = {k: int(b) / v["step_s"] for k, v in sides.items()}
        tflops = {k: v["flops"] / 1e12 for k, v in sides.items()}
        rate = {k: tflops[k] / v["step_s"] for k, v in sides.items()}
        rows[f"gpu_step_b{b}"] = result(
            f"gpu_step_b{b}", round(sps["sgmodel"], 2), round(sps["public"], 2), "samples/s",
            batch=int(b), device=facts["device"], torch=facts["torch"], cuda=facts["cuda"],
            public_code=f"kdwonn/SaG {public_commit or '(commit unknown)'}, fp16 autocast + GradScaler as published",
            ours="bf16 autocast, compile_stages" + (f" (mode {compile_mode})" if compile_mode != "default" else "") + ", fused AdamW",
            step_s={k: round(v["step_s"], 4) for k, v in sides.items()},
            peak_gpu_memory_gb={k: round(v["peak_bytes"] / 1e9, 2) for k, v in sides.items()},
            process_peak_gpu_memory_gb={k: round(v["process_peak_bytes"] / 1e9, 2) for k, v in sides.items()},
            memory_ratio_public_over_ours=round(theirs["peak_bytes"] / mine["peak_bytes"], 3),
            tflop_per_step={k: float(f"{v:.4g}") for k, v in tflops.items()},
            flop_per_step={k: v["flops"] for k, v in sides.items()},
            achieved_tflops={k: float(f"{v:.4g}") for k, v in rate.items()},
            peak_dense_bf16_tflops=peak,
            fraction_of_peak={k: (round(v / peak, 4) if peak else None) for k, v in rate.items()},
            syncs_per_step={k: v["syncs_per_step"] for k, v in sides.items()},
            warmup_s={k: v["warmup_s"] for k, v in sides.items()},  # sgmodel's includes compiling
            timed_steps=steps, phrases_per_image=1,
        )
    return rows


def markdown(rows: dict[str, dict], loader: dict | None) -> str:
    lines = ["| batch | sgmodel samples/s | public samples/s | ratio | peak GPU memory GB (sgmodel / public) | "
             "TFLOP per step (sgmodel / public) | fraction of dense bf16 peak (sgmodel / public) | host syncs per step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        frac = r["fraction_of_peak"]
        frac_text = " / ".join(f"{100 * frac[k]:.1f} %" if frac[k] is not None else "n/a" for k in ("sgmodel", "public"))
        lines.append(
            f"| {r['batch']} | {fmt(r['value'])} | {fmt(r['limit_or_baseline'])} | {r['ratio']:.2f}x | "
            f"{r['peak_gpu_memory_gb']['sgmodel']} / {r['peak_gpu_memory_gb']['public']} | "
            f"{r['tflop_per_step']['sgmodel']:.3g} / {r['tflop_per_step']['public']:.3g} | {frac_text} | "
            f"{r['syncs_per_step']['sgmodel']} / {r['syncs_per_step']['public']} |")
    first = next(iter(rows.values()))
    text = (f"Device: {first['device']}, torch {first['torch']}, CUDA {first['cuda']}; dense bf16 peak taken as "
            f"{first['peak_dense_bf16_tflops']} TFLOP/s.\n\n" + "\n".join(lines))
    if loader:
        text += (f"\n\nLoader at 384x384 ({loader['workers']} workers, pinned, persistent, prefetch): "
                 f"{fmt(loader['value'])} samples/s against the {fmt(loader['limit_or_baseline'])} samples/s the "
                 f"sgmodel step consumes at batch {loader['step_batch']} ({loader['ratio']:.2f}x).")
    return text


def public_commit(checkout: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args: argparse.Namespace) -> dict[str, dict]:
    batches = [int(b) for b in args.batches.split(",")]
    common = [",".join(map(str, batches)), str(args.warmup), str(args.steps), args.public_sag, "1" if args.cpu_smoke else "0",
              args.compile_mode]
    timeout = 900
    ours = run_child("benchmarks.gpu_step", ["--child", "sgmodel", *common], timeout)
    theirs = run_child("benchmarks.gpu_step", ["--child", "public", *common], timeout)
    facts = device_facts()
    if not all(r["finite"] for side in (ours, theirs) for r in side["rows"].values()):
        raise RuntimeError("a non-finite loss in the GPU step benchmark")
    rows = rows_from(ours, theirs, facts, public_commit(args.public_sag), args.steps, args.compile_mode)
    loader_row = None
    if args.loader_workers > 0:
        workers = args.loader_workers
        step_batch = batches[0]
        rate = run_child("benchmarks.gpu_step", ["--loader-child", str(workers), str(step_batch), str(args.loader_batches),
                                                 str(args.loader_images), "0" if args.cpu_smoke else "1"], timeout)
        consumes = rows[f"gpu_step_b{step_batch}"]["value"]
        loader_row = result("gpu_loader", round(rate["images_per_s"], 1), consumes, "samples/s", step_batch=step_batch,
                            device=facts["device"], cores=facts["cores"], image_size="384x384", stored_size="640x480",
                            **{k: rate[k] for k in ("workers", "batch", "shards", "pinned", "tokenizer", "cpu_s_per_image")})
        rows["gpu_loader"] = loader_row
    print(markdown({k: v for k, v in rows.items() if k.startswith("gpu_step")}, loader_row))
    results = Path(args.results)
    previous = json.loads(results.read_text()) if results.is_file() else {}
    when = time.strftime("%Y-%m-%d %H:%M")
    previous.update({k: {**v, "measured": when, "mode": "cpu-smoke" if args.cpu_smoke else "gpu"} for k, v in rows.items()})
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(previous, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--public-sag", help="a local checkout of github.com/kdwonn/SaG (never downloaded by this script)")
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (sgmodel compiles in the first)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and batch size")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for sgmodel's stages, or 'none' (eager)")
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="dataloader workers for the loader measurement (0 skips it)")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--loader-images", type=int, default=800, help="synthetic 640x480 images in the loader's shards")
    parser.add_argument("--results", default=str(RESULTS), help="results file the gpu_step rows are merged into")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configuration on the CPU: checks the plumbing, measures nothing")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--loader-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, batches, warmup, steps, public_sag, smoke, mode = args.child
        print(json.dumps(child(impl, [int(b) for b in batches.split(",")], int(warmup), int(steps), public_sag, smoke == "1", mode)))
        return 0
    if args.loader_child:
        workers, batch, batches, images, on_cuda = (int(v) for v in args.loader_child)
        print(json.dumps(loader_child(workers, batch, batches, images, bool(on_cuda))))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("benchmarks.gpu_step measures a GPU and this machine has none (torch.cuda.is_available() is False); "
              "--cpu-smoke runs its plumbing on the CPU", file=sys.stderr)
        return 2
    if not args.public_sag:
        print("benchmarks.gpu_step needs --public-sag DIR, a local checkout of github.com/kdwonn/SaG", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

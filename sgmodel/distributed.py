"""Distributed helpers that fall back to one process.

Every function works without torchrun (world size 1), so library code calls them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str | None = None) -> torch.device:
    """Join the torchrun process group (env://; nccl on GPU, gloo on CPU) and pick this rank's device."""
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if use_cuda:
        device = torch.device("cuda", get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched_by_torchrun() and not is_enabled():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return device


def backend_name() -> str:
    """"nccl", "gloo", or "single process"."""
    return str(dist.get_backend()) if is_enabled() else "single process"


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def shutdown() -> None:
    if is_enabled():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not is_enabled():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The largest of every rank's `value`, in place; on NCCL the host does not wait for it."""
    if is_enabled():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` from every rank along dim 0; gradients flow to this rank's part only.

    Returns the gathered tensor and the offset of this rank's rows in it. All ranks must pass
    tensors of the same shape (pad if needed).
    """
    if not is_enabled() or get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = get_rank()
    parts[rank] = x  # keep the autograd graph of the local rows
    return torch.cat(parts, dim=0), rank * x.shape[0]


def all_gather_object(obj):
    if not is_enabled():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out

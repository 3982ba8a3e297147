"""Multi-process training with ``torchrun``: process group set-up and the few collectives we need.

``torchrun --nproc-per-node N -m resnetlab train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; gloo
is used on CPU and NCCL on CUDA. Every process draws the same global batch and takes its slice, so N
processes compute the gradient of the same global batch as one process would; only rank 0 writes.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistInfo()


def env_dist_info() -> DistInfo:
    """This process's place in the launch that ``torchrun`` describes in the environment (a single
    process without one)."""
    env = {name: os.environ.get(name) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    try:
        world = int(env["WORLD_SIZE"] or 1)
        if world <= 1:
            return SINGLE_PROCESS
        return DistInfo(int(env["RANK"] or ""), world, int(env["LOCAL_RANK"] or 0))
    except ValueError:
        shown = ", ".join(f"{name}={value!r}" for name, value in env.items())
        raise UserError(
            f"the environment describes no valid multi-process launch ({shown}); start several processes "
            "with torchrun --nproc-per-node N, or unset WORLD_SIZE for one"
        ) from None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it)."""
    info = env_dist_info()
    if info.enabled and not dist.is_initialized():
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it is
        # imported, and DistributedDataParallel imports it (through torch._dynamo). Imported after the
        # group exists, those defaults keep the group alive past destroy_process_group, so gloo's
        # worker threads outlive it and one can free a tensor during interpreter shutdown, which
        # aborts the process ("terminate called without an active exception", the crash described in
        # pytorch/pytorch#179291; PyTorch 2.13, 3 of 57 two-process runs here). Imported first, the
        # defaults are None.
        import torch.distributed.nn.functional  # noqa: F401

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group, which joins gloo's worker threads once nothing else holds it.

    Call it after the last reference to the DistributedDataParallel model is gone (its reducer holds
    the group). The collection frees a model kept only by reference cycles: without it, one of two
    ranks here still had gloo's threads after train() returned.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

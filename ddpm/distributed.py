"""Multi-process data-parallel training with torch DistributedDataParallel, launched by torchrun.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK (and the
rendezvous address) in each one's environment; `init_distributed()` reads them and joins the
process group: NCCL on CUDA, gloo on CPU. Without those variables it does nothing and training
runs in one process, with the same code.

How the work is split (see ddpm.training.Trainer):
    global batch   = TrainConfig.batch_size images per optimizer step, over all ranks
    per rank       = batch_size / world_size, in grad_accum_steps micro-batches
    data           = BatchLoader(rank=, world_size=) gives each rank its slice of the global batch
    t, noise       = drawn for the whole global batch from the step's generator on every rank;
                     each rank takes its slice, so the draws do not depend on the split
    gradients      = averaged over ranks by DDP (mean over the global batch, as in one process)
    checkpoints    = written by rank 0 only; every rank loads the one rank 0 picked

This is each process's side. Launching the processes and hearing back from them (the command
line, the event lines, a failed rank's error) is ddpm.torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job: rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group torchrun set up (idempotent); a single-process context otherwise."""
    if not launched_by_torchrun():
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # before any CUDA work: one device per process
        dist.init_process_group(backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


def current_context() -> DistributedContext:
    """The context of an already initialised process group, or the single-process one."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistributedContext()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over ranks (in place); unchanged in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_object(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (pickled; for small things such as a path)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

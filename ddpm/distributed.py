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

`torchrun_command` builds the torchrun command line the pipeline's training task runs when
TrainConfig asks for more than one process (`num_processes` per node, `nnodes` nodes).
"""

from __future__ import annotations

import os
import sys
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


# --- launching --------------------------------------------------------------------------------


class TrainingProcessError(RuntimeError):
    """A process of a multi-process training failed (the message names the rank and its error);
    `retryable` is False when the error would repeat (bad settings, a NaN loss)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable

# Rank 0 of `python -m ddpm.train_ddp --events` prints one line per event, this prefix and a JSON
# object ({"event": "log" | "checkpoint" | "error", ...}), for the process that launched it.
EVENT_PREFIX = "@ddpm-event "


def device_slots(device: str = "auto") -> tuple[int, str]:
    """How many training processes this machine can give a device each, and what they are:
    the CUDA GPUs (device 'auto' or 'cuda...' on a CUDA machine), else the CPU cores."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU core(s)" + ("" if device == "cpu" else " and no CUDA device")


def check_num_processes(num_processes: int, device: str = "auto") -> None:
    """A ValueError, before anything starts, when this node cannot give each process a device."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but torch sees no CUDA device here")
    if device.startswith("cuda:") and num_processes > 1:
        raise ValueError(f"train.device {device!r} names one GPU, but each of the {num_processes} processes needs "
                         "its own: use 'cuda' or 'auto' (process k takes GPU k)")
    slots, kind = device_slots(device)
    if num_processes > slots:
        raise ValueError(f"train.num_processes={num_processes} but this machine has {slots} {kind}: "
                         f"use at most {slots} processes per node")


def torchrun_command(
    module_args: list[str],
    num_processes: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "ddpm",
    rdzv_timeout: float = 300.0,
    node_rank: int = 0,
) -> list[str]:
    """`python -m torch.distributed.run ...` starting `module_args` in `num_processes` processes on this
    node. One node: a standalone rendezvous on a free local port. Several: a static rendezvous at
    `rdzv_endpoint`, the host:port of node 0 (which hosts it), so global rank 0 (checkpoints, the
    events) is on node 0: the launching one; node `node_rank` runs this with its own rank, and a
    node that is not there within `rdzv_timeout` seconds fails the job. torchrun never restarts a
    failed worker: the pipeline's task retry resumes from a checkpoint."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_processes),
               "--max-restarts", "0", "--monitor-interval", "1"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError(f"train.nnodes={nnodes} needs train.rdzv_endpoint (host:port every node can reach)")
        command += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                    "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
                    "--rdzv-conf", f"timeout={int(max(1, rdzv_timeout))}"]
    return command + module_args


def parent_death_signal(expected_parent: int | None = None):
    """A `preexec_fn` for subprocess.Popen (or a call at start-up) asking Linux to SIGTERM the process
    when its parent dies, kill -9 included, so a killed launcher leaves no training process
    behind. prctl is looked up here, in the parent: the child between fork and exec runs only the
    returned function. If the parent is already gone (not `expected_parent`), the child exits.
    None off Linux."""
    if sys.platform != "linux":
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if expected_parent is not None and os.getppid() != expected_parent:
            os._exit(1)   # the parent died before the signal was set: nobody would send it

    return set_signal

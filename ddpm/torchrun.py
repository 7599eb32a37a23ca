"""The protocol between the pipeline's training task and its torchrun workers: both ends.

When TrainConfig asks for more than one process (`num_processes` per node, `nnodes` nodes), the
launching process runs torchrun, which starts `python -m ddpm.train_ddp --events` in each
process; they talk only through the workers' standard output and one result file:

    event lines   each a single write of `@ddpm-event {json}` (EVENT_PREFIX, then one JSON object)
                  {"event": "log", "step": n, "metrics": {...}}           rank 0, each log window
                  {"event": "checkpoint", "step": n, "path": "..."}       rank 0, each checkpoint
                  {"event": "error", "rank": r, "type": "...", "message": "...", "retryable": bool}
                                                                          any rank, before it exits
    result JSON   written by global rank 0 (on node 0, the launching one) at the end: step,
                  resumed_from, loss_history, checkpoints, images_per_second, compile_seconds,
                  world_size
    other output  torchrun's and the workers' own lines, kept in the run's log

The worker end (ddpm.train_ddp): `emit_event`, and `parent_death_signal()` at start-up.
The launching end: `check_num_processes` (before anything starts), `torchrun_command`,
`train_under_torchrun` (runs torchrun, reads the events with `parse_event`, calls the same
on_log / on_checkpoint callbacks as `Trainer.train`, returns the same TrainResult), `stop`, and
`failure`: a failed run becomes one TrainingProcessError naming the rank torchrun saw fail first
and that rank's error. No process outlives the launcher: torchrun gets a parent-death signal,
and so does each worker from torchrun. torchrun never restarts a worker: a retry of the caller
resumes from the newest valid checkpoint.

The in-process side of a worker (joining the process group, the ranks) is ddpm.distributed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.machine import usable_cores
from ddpm.training import TrainConfig, TrainResult
from ddpm.unet import UNetConfig

EVENT_PREFIX = "@ddpm-event "


class TrainingProcessError(RuntimeError):
    """A process of a multi-process training failed (the message names the rank and its error);
    `retryable` is False when the error would repeat (bad settings, a NaN loss)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


# --- the event lines ---------------------------------------------------------------------------


def emit_event(kind: str, **fields) -> None:
    """One event line for the launching process: a single write, so that other ranks' output on the
    same pipe cannot land inside it (torchrun runs its workers unbuffered)."""
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": kind, **fields}) + "\n")
    sys.stdout.flush()


def parse_event(line: str) -> dict | None:
    """The event a line of `ddpm.train_ddp --events` carries, None for any other output."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:   # cut by other output: kept in the log, not fatal
        return None


# --- processes and devices ---------------------------------------------------------------------


def device_slots(device: str = "auto") -> tuple[int, str]:
    """How many training processes this machine can give a device each, and what they are:
    the CUDA GPUs (device 'auto' or 'cuda...' on a CUDA machine), else the CPU cores."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU(s)"
    return usable_cores(), "CPU core(s)" + ("" if device == "cpu" else " and no CUDA device")


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


def parent_death_signal(expected_parent: int | None = None):
    """A `preexec_fn` for subprocess.Popen (or a call at start-up) asking Linux to SIGTERM the process
    when its parent dies, kill -9 included, so a killed launcher leaves no training process
    behind. prctl is looked up here, in the parent: the child between fork and exec runs only the
    returned function. If the parent is already gone (not `expected_parent`), the child exits.
    None off Linux."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if expected_parent is not None and os.getppid() != expected_parent:
            os._exit(1)   # the parent died before the signal was set: nobody would send it

    return set_signal


# --- the launching end -------------------------------------------------------------------------


def torchrun_command(
    module_args: list[str],
    num_processes: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "ddpm",
    rdzv_timeout: float = 300.0,
    node_rank: int = 0,
) -> list[str]:
    """torchrun starting `module_args` in `num_processes` processes on this node. One node:
    its rendezvous and the workers' sockets on the loopback interface (`python -m
    ddpm.torchrun_loopback`), unreachable from the network. Several: a static rendezvous at
    `rdzv_endpoint`, the host:port of node 0 (which hosts it), so global rank 0 (checkpoints, the
    events) is on node 0: the launching one; node `node_rank` runs this with its own rank, and a
    node that is not there within `rdzv_timeout` seconds fails the job. torchrun never restarts a
    failed worker: the pipeline's task retry resumes from a checkpoint."""
    options = ["--nproc-per-node", str(num_processes), "--max-restarts", "0", "--monitor-interval", "1"]
    if nnodes == 1:   # nothing of a one-node job listens beyond this machine (ddpm.torchrun_loopback)
        return [sys.executable, "-m", "ddpm.torchrun_loopback", *options, *module_args]
    if not rdzv_endpoint:
        raise ValueError(f"train.nnodes={nnodes} needs train.rdzv_endpoint (host:port every node can reach)")
    return [sys.executable, "-m", "torch.distributed.run", *options, "--nnodes", str(nnodes), "--node-rank",
            str(node_rank), "--rdzv-backend", "static", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"timeout={int(max(1, rdzv_timeout))}", *module_args]


def train_under_torchrun(
    dataset_path: str,
    model_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    checkpoint_dir: str,
    on_log: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> TrainResult:
    """Train under torchrun on this node (`num_processes` processes; one of `nnodes` nodes), as
    `Trainer.train` does in one process: the same callbacks, called here from rank 0's events.

    torchrun's whole output goes to `train-processes.log` beside `checkpoint_dir`; rank 0's
    progress, and for several nodes the other nodes' commands, go to `logger` (this module's by
    default). A failed rank raises TrainingProcessError naming the rank torchrun saw fail first
    and that rank's error; the processes never outlive this call (nor this process: they are
    signalled when it dies).
    """
    logger = logging.getLogger(__name__) if logger is None else logger
    world = train_config.world_size
    log_path = Path(checkpoint_dir).parent / "train-processes.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rdzv_id = Path(checkpoint_dir).parent.name
    with tempfile.TemporaryDirectory(prefix="ddpm-torchrun-") as tmp:
        result_path = Path(tmp) / "result.json"   # written by global rank 0: on this node (node 0)
        module_args = ["-m", "ddpm.train_ddp", "--data", str(dataset_path), "--checkpoint-dir", str(checkpoint_dir),
                       "--model", model_config.model_dump_json(), "--diffusion", diffusion_config.model_dump_json(),
                       "--train", train_config.model_dump_json(), "--result", str(result_path), "--events",
                       "--no-progress"]
        placement = (train_config.num_processes, train_config.nnodes, train_config.rdzv_endpoint, rdzv_id,
                     train_config.rdzv_timeout)
        command = torchrun_command(module_args, *placement)
        env = dict(os.environ)
        slots, kind = device_slots(train_config.device)
        if "CPU" in kind:   # share the cores between the processes (torchrun would give each one thread)
            env["OMP_NUM_THREADS"] = str(max(1, slots // train_config.num_processes))
        logger.info(f"training in {world} processes ({train_config.num_processes} per node x "
                    f"{train_config.nnodes} node(s)); output in {log_path}")
        for node in range(1, train_config.nnodes):   # this node is node 0; the others join its rendezvous
            other = torchrun_command(module_args, *placement, node_rank=node)
            logger.info(f"on node {node}, with the same DDPM_HOME path on shared storage, run: "
                        + " ".join(shlex.quote(part) for part in other))
        errors: dict[int, dict] = {}
        tail: deque[str] = deque(maxlen=200)
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {' '.join(command)}\n")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       bufsize=1, env=env, preexec_fn=parent_death_signal(os.getpid()))
            try:
                for line in process.stdout:
                    log_file.write(line)
                    event = parse_event(line)
                    if event is None:
                        tail.append(line.rstrip("\n"))
                        continue
                    if event["event"] == "log":
                        m = event["metrics"]
                        logger.info(f"step {event['step']}/{train_config.steps}: loss {m['loss']:.4f}, "
                                    + (f"{m['images_per_second']:.0f} img/s" if "images_per_second" in m
                                       else f"compiled in {m.get('compile_seconds', 0):.0f} s"))
                        if on_log:
                            on_log(event["step"], m)
                    elif event["event"] == "checkpoint":
                        logger.info(f"checkpoint {event['path']}")
                        if on_checkpoint:
                            on_checkpoint(event["step"], Path(event["path"]))
                    elif event["event"] == "error":
                        errors.setdefault(event["rank"], event)
                returncode = process.wait()
            finally:
                stop(process)
        if returncode != 0:
            rendezvous = None
            if train_config.nnodes > 1:
                rendezvous = (f"{train_config.rdzv_endpoint} failed: not all {train_config.nnodes} nodes joined "
                              f"within {train_config.rdzv_timeout:g} s, or it cannot be reached")
            raise failure(returncode, errors, list(tail), world, log_path, rendezvous)
        summary = json.loads(result_path.read_text())
    history = [(int(step), float(loss)) for step, loss in summary["loss_history"]]
    return TrainResult(step=summary["step"], final_loss=history[-1][1] if history else float("nan"),
                       images_per_second=summary["images_per_second"],
                       checkpoints=[Path(p) for p in summary["checkpoints"]], loss_history=history,
                       resumed_from=summary["resumed_from"], compile_seconds=summary.get("compile_seconds"))


def stop(process: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """End torchrun if it still runs: SIGTERM (it stops its workers), then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):(.*?)(?:={10,}|$)", re.S)
_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
# Errors a rank raises because a peer vanished: consequences, never the root cause
_PEER_LOST = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|DistNetworkError|"
                        r"DistBackendError|NCCL communicator was aborted|remote process exited", re.I)


def root_cause(tail: list[str], errors: dict[int, dict]) -> tuple[int | None, int | None]:
    """The failed rank to blame and its exit code. torchrun names the first failure it observed,
    but when one rank dies (SIGKILL from the OOM killer, a lost spot host) its peers fail on the
    broken connection within the same second and torchrun may name one of them. So torchrun's
    choice stands unless its own error is a lost peer; then a rank killed by a signal, else
    another failed rank, is blamed; a lost peer only when no other rank failed."""
    text = "\n".join(tail)
    block = _ROOT_CAUSE.search(text)
    listed = text[text.rfind("Failures:"):] if "Failures:" in text else ""
    failures = {int(rank): int(code) for rank, code in _FAILURE.findall(listed)}
    first = None
    if block and (found := re.search(r"rank\s*:\s*(\d+)", block.group(1))):
        first = int(found.group(1))
        if code := re.search(r"exitcode\s*:\s*(-?\d+)", block.group(1)):
            failures[first] = int(code.group(1))
    elif errors:
        first = min(errors)
    if first is None:
        return None, None

    def peer_lost(rank: int) -> bool:
        error = errors.get(rank)
        return error is not None and bool(_PEER_LOST.search(f"{error['type']}: {error['message']}"))

    others = sorted(set(failures) - {first}, key=lambda rank: (failures[rank] >= 0, rank))   # signals first
    for rank in [first] + others:
        if not peer_lost(rank):
            return rank, failures.get(rank)
    return first, failures.get(first)


def failure(returncode: int, errors: dict[int, dict], tail: list[str], world: int, log_path: Path,
            rendezvous: str | None = None) -> TrainingProcessError:
    """The error for a torchrun that failed: the rank to blame (see `root_cause`), with the error
    that rank printed (or the signal that killed it); else torchrun's own last error line."""
    rank, exitcode = root_cause(tail, errors)
    where = f" (full output: {log_path})"
    if rank is not None and rank in errors:
        error = errors[rank]
        return TrainingProcessError(f"training process rank {rank} of {world} failed: {error['type']}: "
                                    f"{error['message']}{where}", retryable=error.get("retryable", True))
    if rank is not None and exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        return TrainingProcessError(f"training process rank {rank} of {world} was killed by {name}{where}")
    if rank is not None:
        return TrainingProcessError(f"training process rank {rank} of {world} exited with code {exitcode}{where}")
    # torchrun itself failed (no rank ran): the first error line is the innermost cause
    first_error = next((line.strip() for line in tail if re.match(r"[\w.]*(Error|Exception)(:\s|$)", line.strip())), None)
    detail = first_error or (tail[-1] if tail else "no output")
    if rendezvous and re.search(r"Rendezvous|DistNetworkError|DistStoreError|timed out", "\n".join(tail)):
        return TrainingProcessError(f"the rendezvous at {rendezvous} ({detail}){where}")
    return TrainingProcessError(f"torchrun failed (exit code {returncode}): {detail}{where}")

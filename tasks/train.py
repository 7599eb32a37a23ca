"""The training task: the ddpm Trainer on a prepared dataset, logging to an MLflow run.

One process (the default) trains in the task's own process. With `TrainConfig.world_size` > 1
the task launches torchrun (`ddpm.distributed.torchrun_command`) running `ddpm.train_ddp` in
`num_processes` processes, reads rank 0's events (log windows, checkpoints) from its output into
MLflow and the Prefect log, and turns a failed rank into a task failure that names the rank and
its error. Either way a retry resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch
from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from ddpm.checkpoint import list_checkpoints
from ddpm.diffusion import DiffusionConfig
from ddpm.distributed import (EVENT_PREFIX, TrainingProcessError, check_num_processes, device_slots,
                              parent_death_signal, torchrun_command)
from ddpm.training import REPEATING_ERRORS, TrainConfig, TrainResult, dataset_trainer, resolve_device
from ddpm.unet import UNet, UNetConfig, count_parameters
from ddpm.utilisation import matmul_peak, training_flops_per_image
from tasks import plots, tracking
from tasks.sample import progress_grid



def _retry_unless_deterministic(task, task_run, state) -> bool:
    """A NaN loss, a bad config or a checkpoint of other settings fails the same way again: retry
    only other failures (a crash, a killed rank)."""
    try:
        state.result()
    except TrainingProcessError as error:
        return error.retryable
    except REPEATING_ERRORS:
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=_retry_unless_deterministic)
def train_model(
    dataset_path: str,
    model_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    run_id: str,
    checkpoint_dir: str,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> dict:
    """Train (or resume) in `checkpoint_dir`; metrics, curves and the schedule go to MLflow run `run_id`.

    A retry after a crash resumes from the newest valid checkpoint in `checkpoint_dir`.
    `on_checkpoint(step, path)` is called after each checkpoint is written (to publish it, or in
    tests to fail right after one). Returns the summary numbers, `resumed_from` (the step the
    last attempt started from, None for a fresh start), `checkpoints` (all on disk, oldest
    first) and `checkpoint` (the final one, for sampling and evaluation).
    With `train_config.world_size` > 1 the training runs under torchrun (see the module doc).
    """
    launched = train_config.world_size > 1
    if launched:
        check_num_processes(train_config.num_processes, train_config.device)
        parameters = count_parameters(UNet(model_config))
    else:
        trainer = dataset_trainer(dataset_path, model_config, diffusion_config, train_config, checkpoint_dir)
        parameters = count_parameters(trainer.model)
    mlflow_client = tracking.client()
    mlflow_client.log_param(run_id, "model.parameters", parameters)

    # A resumed run (a retry, `--resume`) trains again from its checkpoint the steps it had logged
    # after it; training is deterministic, so those points are already right: log each step once.
    logged = mlflow_client.get_metric_history(run_id, "loss")
    metrics = tracking.MetricBuffer(run_id, skip_through=max((m.step for m in logged), default=-1),
                                    system_metrics=not launched)   # this process's use says nothing then
    if train_config.progress_images:
        # on the training device in-process; beside torchrun's ranks, on the CPU
        grid_device = "cpu" if launched else train_config.device
        on_checkpoint = chained(progress_grid(run_id, train_config.progress_images, grid_device), on_checkpoint)
    start = time.perf_counter()
    try:
        if launched:
            result = train_with_torchrun(dataset_path, model_config, diffusion_config, train_config, checkpoint_dir,
                                         on_log=metrics.log, on_checkpoint=on_checkpoint)
        else:
            result = trainer.train(on_log=metrics.log, on_checkpoint=on_checkpoint)
    finally:
        metrics.flush()  # what was measured before a failure stays visible in MLflow
    train_seconds = time.perf_counter() - start

    plots.log_figure(run_id, lambda: plots.loss_curve(result.loss_history,
                                                      f"loss, {diffusion_config.schedule} schedule"),
                     "plots/loss_curve.png")
    plots.log_figure(run_id, lambda: plots.schedule_plot({diffusion_config.schedule: diffusion_config.make_schedule()}),
                     "plots/noise_schedule.png")
    summary = {
        "final_loss": result.final_loss,
        "images_per_second": result.images_per_second,
        "steps": result.step,
        "world_size": train_config.world_size,
        "logging_seconds": metrics.seconds,
        "logging_fraction": metrics.seconds / max(train_seconds, 1e-9),  # share of the train() wall time
        **training_utilisation(model_config, train_config, result.images_per_second),
    }
    if result.compile_seconds is not None:
        summary["compile_seconds"] = result.compile_seconds
    mlflow_client.log_batch(run_id, metrics=[
        tracking.Metric(f"train.{key}", float(value), int(time.time() * 1000), result.step)
        for key, value in summary.items()
    ])
    checkpoints = [str(p) for p in list_checkpoints(Path(checkpoint_dir))]
    return {**summary, "resumed_from": result.resumed_from, "checkpoints": checkpoints,
            "checkpoint": checkpoints[-1] if checkpoints else None, "log_batches": metrics.batches,
            "log_calls": metrics.calls}


def training_utilisation(model_config: UNetConfig, train_config: TrainConfig,
                         images_per_second: float) -> dict[str, float]:
    """How close the training just done ran to the hardware (ddpm.utilisation): FLOPs per image,
    achieved GFLOP/s, the devices' matmul peak in the training precision, and their ratio (MFU).
    A measurement that fails is a warning: the training it describes is done."""
    if not images_per_second:   # no step trained (a resume of a finished run)
        return {}
    try:
        device = resolve_device(train_config.device)
        dtype = torch.bfloat16 if train_config.autocast_bf16(device) else torch.float32
        # one GPU per process; CPU processes share each node's cores, which this process's peak uses
        devices = train_config.world_size if device.type == "cuda" else train_config.nnodes
        flops = training_flops_per_image(model_config)
        # TF32 as the Trainer trains on CUDA
        achieved, peak = flops * images_per_second / 1e9, matmul_peak(dtype, device, tf32=True) * devices
    except Exception as error:
        _logger().warning(f"no utilisation figures: {type(error).__name__}: {error}")
        return {}
    return {"gflops_per_image": flops / 1e9, "achieved_gflops_per_second": achieved,
            "peak_gflops_per_second": peak, "mfu": achieved / peak}


def chained(*callbacks: Callable | None) -> Callable:
    """One callback calling each of `callbacks` (None skipped) in turn with the same arguments."""
    def call_each(*args) -> None:
        for callback in callbacks:
            if callback:
                callback(*args)

    return call_each


def train_with_torchrun(
    dataset_path: str,
    model_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    checkpoint_dir: str,
    on_log: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> TrainResult:
    """Train under torchrun on this node (`num_processes` processes; one of `nnodes` nodes), as
    `Trainer.train` does in one process: the same callbacks, called here from rank 0's events.

    torchrun's whole output goes to `train-processes.log` beside `checkpoint_dir`; rank 0's
    progress goes to the Prefect log. A failed rank raises TrainingProcessError naming the rank
    torchrun saw fail first and that rank's error; the processes never outlive this call (nor
    this process: they are signalled when it dies).
    """
    logger = _logger()
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


def parse_event(line: str) -> dict | None:
    """The event a line of `ddpm.train_ddp --events` carries, None for any other output."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:   # cut by other output: kept in the log, not fatal
        return None


def _logger():
    """The Prefect run logger inside a flow or task run, this module's logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


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


def failure(returncode: int, errors: dict[int, dict], tail: list[str], world: int, log_path: Path,
            rendezvous: str | None = None) -> TrainingProcessError:
    """The error for a torchrun that failed: the rank torchrun reports as the root cause, with the
    error that rank printed (or the signal that killed it); else torchrun's own last error line."""
    block = _ROOT_CAUSE.search("\n".join(tail))
    rank = exitcode = None
    if block:
        found_rank = re.search(r"rank\s*:\s*(\d+)", block.group(1))
        found_code = re.search(r"exitcode\s*:\s*(-?\d+)", block.group(1))
        rank = int(found_rank.group(1)) if found_rank else None
        exitcode = int(found_code.group(1)) if found_code else None
    if rank is None and errors:
        rank = min(errors)
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

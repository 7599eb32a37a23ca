"""The training task: the ddpm Trainer on a prepared dataset, logging to an MLflow run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prefect import task

from ddpm.checkpoint import CheckpointError, list_checkpoints
from ddpm.diffusion import DiffusionConfig
from ddpm.train_ddp import dataset_trainer
from ddpm.training import NonFiniteLossError, TrainConfig
from ddpm.unet import UNetConfig, count_parameters
from tasks import plots, tracking


def _retry_unless_deterministic(task, task_run, state) -> bool:
    """A NaN loss, a bad config or a checkpoint of other settings fails the same way again: retry
    only other failures."""
    try:
        state.result()
    except (NonFiniteLossError, ValueError, CheckpointError):
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
    """
    trainer = dataset_trainer(dataset_path, model_config, diffusion_config, train_config, checkpoint_dir)
    mlflow_client = tracking.client()
    mlflow_client.log_param(run_id, "model.parameters", count_parameters(trainer.model))

    # A resumed run (a retry, `--resume`) trains again from its checkpoint the steps it had logged
    # after it; training is deterministic, so those points are already right: log each step once.
    logged = mlflow_client.get_metric_history(run_id, "loss")
    metrics = tracking.MetricBuffer(run_id, skip_through=max((m.step for m in logged), default=-1))
    start = time.perf_counter()
    try:
        result = trainer.train(on_log=metrics.log, on_checkpoint=on_checkpoint)
    finally:
        metrics.flush()  # what was measured before a failure stays visible in MLflow
    train_seconds = time.perf_counter() - start

    plots.log_figure(run_id, lambda: plots.loss_curve(result.loss_history,
                                                      f"loss, {diffusion_config.schedule} schedule"),
                     "plots/loss_curve.png")
    plots.log_figure(run_id, lambda: plots.schedule_plot({diffusion_config.schedule: trainer.schedule}),
                     "plots/noise_schedule.png")
    summary = {
        "final_loss": result.final_loss,
        "images_per_second": result.images_per_second,
        "steps": result.step,
        "logging_seconds": metrics.seconds,
        "logging_fraction": metrics.seconds / max(train_seconds, 1e-9),  # share of the train() wall time
    }
    mlflow_client.log_batch(run_id, metrics=[
        tracking.Metric(f"train.{key}", float(value), int(time.time() * 1000), result.step)
        for key, value in summary.items()
    ])
    checkpoints = [str(p) for p in list_checkpoints(Path(checkpoint_dir))]
    return {**summary, "resumed_from": result.resumed_from, "checkpoints": checkpoints,
            "checkpoint": checkpoints[-1] if checkpoints else None, "log_batches": metrics.batches,
            "log_calls": metrics.calls}

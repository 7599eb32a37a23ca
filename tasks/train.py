"""The training task: the ddpm Trainer on a prepared dataset, logging to an MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
from prefect import task

from ddpm.checkpoint import list_checkpoints
from ddpm.data import BatchLoader, load_prepared, validate_for_model
from ddpm.diffusion import DiffusionConfig
from ddpm.training import NonFiniteLossError, Trainer, TrainConfig
from ddpm.unet import UNetConfig, count_parameters
from tasks import plots, tracking


def _retry_unless_deterministic(task, task_run, state) -> bool:
    """A NaN loss or a bad config fails the same way again: retry only other failures."""
    try:
        state.result()
    except (NonFiniteLossError, ValueError):
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
) -> dict:
    """Train (or resume) in `checkpoint_dir`; metrics, curves and the schedule go to MLflow run `run_id`.

    A retry after a crash resumes from the newest valid checkpoint in `checkpoint_dir`.
    """
    dataset = load_prepared(Path(dataset_path))
    validate_for_model(dataset, model_config.image_size, model_config.in_channels)
    train_images, _ = dataset.split("train")
    loader = BatchLoader(train_images, batch_size=train_config.micro_batch_size, seed=train_config.seed,
                         hflip=train_config.hflip)
    trainer = Trainer(model_config, diffusion_config, train_config, loader.batch, checkpoint_dir)
    mlflow_client = tracking.client()
    mlflow_client.log_param(run_id, "model.parameters", count_parameters(trainer.model))

    metrics = tracking.MetricBuffer(run_id)
    try:
        result = trainer.train(on_log=metrics.log)
    finally:
        metrics.flush()  # what was measured before a failure stays visible in MLflow

    figure = plots.loss_curve(result.loss_history, f"loss, {diffusion_config.schedule} schedule")
    tracking.log_figure(run_id, figure, "plots/loss_curve.png")
    plt.close(figure)
    figure = plots.schedule_plot({diffusion_config.schedule: trainer.schedule})
    tracking.log_figure(run_id, figure, "plots/noise_schedule.png")
    plt.close(figure)
    summary = {
        "final_loss": result.final_loss,
        "images_per_second": result.images_per_second,
        "steps": result.step,
        "logging_seconds": metrics.seconds,
    }
    mlflow_client.log_batch(run_id, metrics=[
        tracking.Metric(f"train.{key}", float(value), int(time.time() * 1000), result.step)
        for key, value in summary.items()
    ])
    return {**summary, "resumed_from": result.resumed_from,
            "checkpoints": [str(p) for p in list_checkpoints(Path(checkpoint_dir))]}

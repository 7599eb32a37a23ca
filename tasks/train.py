"""The training task: the ddpm Trainer on a prepared dataset, logging to an MLflow run.

One process (the default) trains in the task's own process. With `TrainConfig.world_size` > 1
the task trains under torchrun (`ddpm.torchrun.train_under_torchrun`: `ddpm.train_ddp` in
`num_processes` processes), which forwards rank 0's events (log windows, checkpoints) to the
same callbacks, here MLflow and the Prefect log, and turns a failed rank into a
TrainingProcessError that names the rank and its error. Either way a retry resumes from the
newest valid checkpoint; errors that would repeat are not retried. The utilisation figures
(`ddpm.utilisation.training_utilisation`) join the run's summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from ddpm.checkpoint import list_checkpoints
from ddpm.diffusion import DiffusionConfig
from ddpm.torchrun import TrainingProcessError, check_num_processes, train_under_torchrun
from ddpm.training import TrainConfig, dataset_trainer, is_repeating
from ddpm.unet import UNet, UNetConfig, count_parameters
from ddpm.utilisation import training_utilisation
from tasks import contract, plots, run_files, tracking
from tasks.sample import progress_grid



def _retry_unless_deterministic(task, task_run, state) -> bool:
    """A NaN loss, a bad config, a checkpoint of other settings or a full disk fails the same way
    again: retry only other failures (a crash, a killed rank)."""
    try:
        state.result()
    except TrainingProcessError as error:
        return error.retryable
    except Exception as error:
        return not is_repeating(error)
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
    `on_checkpoint(step, path)` is called after each checkpoint is written (in tests, to fail right
    after one). Where other hosts read the run (a tracking server), each checkpoint is also
    published to the run's artifact store in the background (tasks.run_files.CheckpointPublisher);
    the summary says how many bytes and which steps reached it. Returns the summary numbers, `resumed_from` (the step the
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
    mlflow_client.log_param(run_id, contract.PARAMETERS_PARAM, parameters)

    # A resumed run (a retry, `--resume`) trains again from its checkpoint the steps it had logged
    # after it; training is deterministic, so those points are already right: log each step once.
    logged = mlflow_client.get_metric_history(run_id, contract.LOSS_METRIC)
    metrics = tracking.MetricBuffer(run_id, skip_through=max((m.step for m in logged), default=-1),
                                    system_metrics=not launched)   # this process's use says nothing then
    if train_config.progress_images:
        # on the training device in-process; beside torchrun's ranks, on the CPU
        grid_device = "cpu" if launched else train_config.device
        on_checkpoint = chained(progress_grid(run_id, train_config.progress_images, grid_device), on_checkpoint)
    publisher = None
    if run_files.publishing():
        publisher = run_files.CheckpointPublisher(run_id, checkpoint_dir, train_config.keep_last,
                                                  warn=_logger().warning)
        on_checkpoint = chained(on_checkpoint, publisher)
    start = time.perf_counter()
    try:
        if launched:
            result = train_under_torchrun(dataset_path, model_config, diffusion_config, train_config, checkpoint_dir,
                                          on_log=metrics.log, on_checkpoint=on_checkpoint, logger=_logger())
        else:
            result = trainer.train(on_log=metrics.log, on_checkpoint=on_checkpoint)
    except BaseException:
        try:
            metrics.flush()  # what was measured before a failure stays visible in MLflow
            if publisher is not None:   # the checkpoints written so far still reach the store
                publisher.close(timeout=120)
        except Exception:  # noqa: BLE001 (the store failing too, a full disk: the first error says why)
            pass
        raise
    metrics.flush()
    train_seconds = time.perf_counter() - start
    stored = publisher.close() if publisher is not None else None
    if publisher is not None:
        mlflow_client.log_metric(run_id, contract.PUBLISHED_MIB_METRIC, publisher.bytes_uploaded / 2**20)

    if not result.loss_history and result.resumed_from is not None:
        # resumed at its last step (a failure after training): nothing trained now, so the loss
        # curve and the training summary the run logged stay as they are
        summary = _logged_summary(mlflow_client.get_run(run_id).data.metrics, result.step)
    else:
        # the whole run's curve: the steps logged before a crash and those trained since
        history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, contract.LOSS_METRIC))
        plots.log_figure(run_id, lambda: plots.loss_curve(history or result.loss_history,
                                                          f"loss, {diffusion_config.schedule} schedule"),
                         contract.LOSS_CURVE_ARTIFACT)
        plots.log_figure(run_id, lambda: plots.schedule_plot({diffusion_config.schedule:
                                                              diffusion_config.make_schedule()}),
                         contract.SCHEDULE_PLOT_ARTIFACT)
        summary = {
            "final_loss": result.final_loss,
            "images_per_second": result.images_per_second,
            "steps": result.step,
            "world_size": train_config.world_size,
            "logging_seconds": metrics.seconds,
            "logging_fraction": metrics.seconds / max(train_seconds, 1e-9),  # share of the train() wall time
            **training_utilisation(model_config, train_config, result.images_per_second, _logger()),
        }
        if result.compile_seconds is not None:
            summary["compile_seconds"] = result.compile_seconds
        mlflow_client.log_batch(run_id, metrics=[
            tracking.Metric(contract.TRAIN_METRIC_PREFIX + key, float(value), int(time.time() * 1000), result.step)
            for key, value in summary.items()
        ])
    checkpoints = [str(p) for p in list_checkpoints(Path(checkpoint_dir))]
    if publisher is not None:
        summary = {**summary, "published_bytes": publisher.bytes_uploaded, "published_steps": stored}
    return {**summary, "resumed_from": result.resumed_from, "checkpoints": checkpoints,
            "checkpoint": checkpoints[-1] if checkpoints else None, "log_batches": metrics.batches,
            "log_calls": metrics.calls}


def _logged_summary(run_metrics: dict[str, float], step: int) -> dict:
    """The training summary a run already logged (its train.* metrics), at `step`."""
    summary = {key.removeprefix(contract.TRAIN_METRIC_PREFIX): value for key, value in run_metrics.items()
               if key.startswith(contract.TRAIN_METRIC_PREFIX)}
    return {"final_loss": float("nan"), "images_per_second": 0.0, **summary, "steps": step}


def chained(*callbacks: Callable | None) -> Callable:
    """One callback calling each of `callbacks` (None skipped) in turn with the same arguments."""
    def call_each(*args) -> None:
        for callback in callbacks:
            if callback:
                callback(*args)

    return call_each


def _logger():
    """The Prefect run logger inside a flow or task run, this module's logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)

"""compare_schedules: the same pipeline once per noise schedule, everything else equal, side by side.

One parent MLflow run holds the comparison (table, plot); each schedule trains in an MLflow child
run (tag `mlflow.parentRunId`) with the same data, model, training settings and seed. The
per-schedule pipelines are tasks, so they run concurrently on the flow's task runner,
`max_parallel` at a time (threads on this machine; see docs/orchestration.md for Dask or Ray).

    python -m flows.compare_schedules          # linear vs cosine vs sigmoid with the defaults
"""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import AfterValidator, Field

from ddpm.data import DataConfig, read_manifest, validate_for_model
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.schedules import BETA_SCHEDULES
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig
from flows.train_pipeline import (
    DEFAULT_MODEL, DEFAULT_SAMPLING, DEFAULT_TRAIN, DataParam, ExperimentName, ModelParam, SamplingParam, TrainParam,
    check_config, run_pipeline, start_run,
)
from tasks import plots, settings, tracking
from tasks.data import prepare_data
from tasks.evaluate import ExtractorKind, check_evaluation
from tasks.registry import promote_best

TABLE_COLUMNS = ["schedule", "metric", "num_samples", "fid", "fid_floor", "final_loss", "images_per_second", "steps", "run_id"]


def _known_distinct_schedules(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in BETA_SCHEDULES]
    if unknown:
        raise ValueError(f"unknown noise schedule(s) {unknown}; choose from {sorted(BETA_SCHEDULES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"schedules repeat: {names}")
    return names


# Validated when the flow is called (and shown as a typed list in the Prefect UI form): a bad
# list fails the flow run before any MLflow run exists.
ScheduleList = Annotated[list[str], Field(min_length=1, description=f"any of {sorted(BETA_SCHEDULES)}"),
                         AfterValidator(_known_distinct_schedules)]


@task(name="train_schedule", task_run_name="train-{diffusion.schedule}")
def train_schedule(
    data: DataConfig, model: UNetConfig, diffusion: DiffusionConfig, train: TrainConfig,
    sampling: SamplerConfig, fid_extractor: ExtractorKind, experiment: str, parent_run_id: str,
) -> dict:
    """The whole pipeline for one schedule, as an MLflow child run of the comparison."""
    return run_pipeline(data, model, diffusion, train, sampling, fid_extractor, experiment,
                        run_name=f"schedule-{diffusion.schedule}", parent_run_id=parent_run_id,
                        tags={"comparison.parent": parent_run_id})


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per schedule, best FID first."""
    rows = []
    for schedule, summary in results.items():
        evaluation = summary["evaluation"]
        metric = evaluation["metric"]
        rows.append({"schedule": schedule, "metric": metric, "num_samples": evaluation["num_samples"],
                     "fid": evaluation[metric], "fid_floor": evaluation[f"{metric}_floor"],
                     "final_loss": summary["final_loss"], "images_per_second": summary["images_per_second"],
                     "steps": summary["steps"], "run_id": summary["run_id"]})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("fid", kind="stable").reset_index(drop=True)


@flow(name="compare_schedules", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def compare_schedules(
    schedules: ScheduleList = ["linear", "cosine", "sigmoid"],  # noqa: B006 (pydantic copies it)
    num_timesteps: Annotated[int, Field(ge=1)] = 1000,
    data: DataParam = DataConfig(),
    model: ModelParam = DEFAULT_MODEL,
    train: TrainParam = DEFAULT_TRAIN,
    sampling: SamplingParam = DEFAULT_SAMPLING,
    fid_extractor: ExtractorKind = "auto",
    experiment: ExperimentName = "ddpm-schedules",
    max_parallel: Annotated[int, Field(ge=1, le=8, description="pipelines training at once")] = 1,
    promote_to: str | None = "ddpm",
) -> pd.DataFrame:
    """Train, sample and score one model per noise schedule with everything else (seed included) equal.

    Logs to a parent MLflow run: comparison.csv / comparison.md (schedule, FID, floor, final loss,
    images/s, steps, child run id) and plots/schedules.png (alphas_cumprod of each schedule, FID
    in the legend); the same table is a Prefect table artifact `schedule-comparison`.
    Returns the table, best FID first. Then the best run is offered to the registered model
    `promote_to` (None: no promotion), which moves its `champion` alias only if it is better.
    """
    diffusions = {name: DiffusionConfig(schedule=name, num_timesteps=num_timesteps) for name in schedules}
    check_config(data, model, fid_extractor, train=train)
    home = settings.ddpm_home()
    # Prepared once here, so the concurrent pipelines all hit the cache instead of racing to write it.
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(data, out_dir=str(home / "data"))
    # Everything checkable is checked before any run exists or anything trains.
    manifest = read_manifest(dataset_path)
    check_evaluation(fid_extractor, manifest, sampling.num_images)
    validate_for_model(manifest, model.image_size, model.in_channels, model.num_classes)
    parent_run_id = start_run(experiment, None, {"schedules": schedules, "num_timesteps": num_timesteps,
                                                 "data": data.model_dump(mode="json"),
                                                 "model": model.model_dump(mode="json"),
                                                 "train": train.model_dump(mode="json"),
                                                 "sampling": sampling.model_dump(mode="json")},
                              tags={"comparison": "noise_schedule"})
    print(f"comparison: MLflow parent run {parent_run_id} in experiment '{experiment}'")
    with tracking.run_lifecycle(parent_run_id):
        results: dict[str, dict] = {}
        names = list(schedules)
        for start in range(0, len(names), max_parallel):  # at most max_parallel pipelines at once
            futures = {name: train_schedule.submit(data, model, diffusions[name], train, sampling, fid_extractor,
                                                   experiment, parent_run_id)
                       for name in names[start : start + max_parallel]}
            results.update({name: future.result() for name, future in futures.items()})
        table = comparison_table(results)
        log_comparison(parent_run_id, table, diffusions)
    print(table.to_string(index=False))
    if promote_to:
        promote_best([experiment], promote_to)
    return table


def log_comparison(parent_run_id: str, table: pd.DataFrame, diffusions: dict[str, DiffusionConfig]) -> None:
    """The table (CSV, markdown, Prefect table artifact) and the schedule plot, to the parent run."""
    import tempfile
    from pathlib import Path

    markdown = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, md_path = Path(tmp) / "comparison.csv", Path(tmp) / "comparison.md"
        table.to_csv(csv_path, index=False)
        md_path.write_text(markdown + "\n")
        tracking.log_file(parent_run_id, csv_path)
        tracking.log_file(parent_run_id, md_path)
    fids = {row.schedule: f"{row.metric} {row.fid:.2f}" for row in table.itertuples()}
    plots.log_figure(parent_run_id,
                     lambda: plots.schedule_plot({name: c.make_schedule() for name, c in diffusions.items()}, fids),
                     "plots/schedules.png")
    best = table.iloc[0]
    tracking.client().set_tag(parent_run_id, "comparison.best_schedule", best.schedule)
    tracking.client().set_tag(parent_run_id, "comparison.metric", best.metric)
    tracking.client().log_metric(parent_run_id, "best_fid", float(best.fid))
    create_table_artifact(key="schedule-comparison", table=table.to_dict(orient="records"),
                          description=f"noise schedules compared in MLflow run {parent_run_id}, best FID first")
    create_markdown_artifact(key="schedule-comparison-summary",
                             markdown=f"Best schedule: **{best.schedule}** ({best.metric} {best.fid:.2f} at "
                                      f"{best.num_samples} samples); "
                                      f"MLflow parent run `{parent_run_id}`.")


def _has_tabulate() -> bool:  # pandas' to_markdown needs the optional tabulate package
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    compare_schedules()

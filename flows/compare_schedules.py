"""compare_schedules: the same pipeline once per noise schedule, everything else equal, side by side.

One parent MLflow run holds the comparison (table, plot); each schedule trains in an MLflow child
run (tag `mlflow.parentRunId`) with the same data, model, training settings and seed. The
per-schedule pipelines are tasks of the subflow `train_schedules`, which runs them on the task
runner `dask_cluster` picks: threads in this process (`max_parallel` at a time), a temporary
local Dask cluster of `max_parallel` worker processes ("local"), or an existing Dask scheduler
("tcp://host:8786"; docs/orchestration.md says what its workers need).

    python -m flows.compare_schedules          # linear vs cosine vs sigmoid with the defaults
"""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import AfterValidator, Field

from ddpm.data import read_manifest, validate_for_model
from ddpm.diffusion import DiffusionConfig
from ddpm.metrics.measures import measure_of, parse_metric
from ddpm.metrics.scoring import ExtractorKind, check_evaluation
from ddpm.schedules import BETA_SCHEDULES
from flows.runners import DaskCluster, fan_out_runner
from flows.train_pipeline import ExperimentName, check_config, run_pipeline, start_run
from tasks import contract, plots, run_files, settings, tracking
from tasks.config import DEFAULTS, DataParam, MeasureName, ModelParam, PipelineConfig, SamplingParam, TrainParam
from tasks.data import prepare_data
from tasks.evaluate import warm_scoring_cache
from tasks.registry import promote_best

# "fid" and "fid_floor" hold the primary metric and its floor (FID unless the runs rank by another
# measure); kid, precision and recall are those of the primary's features, when measured
TABLE_COLUMNS = ["schedule", "metric", "num_samples", "fid", "fid_floor", "kid", "kid_std", "precision", "recall",
                 "final_loss", "images_per_second", "steps", "run_id"]


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


def schedule_configs(schedules: list[str], num_timesteps: int, base: PipelineConfig) -> dict[str, PipelineConfig]:
    """The configuration of each schedule's run: `base` with that schedule and T, everything else
    (the loss weighting and prediction type of its diffusion section included) equal."""
    return {name: base.model_copy(update={"diffusion": base.diffusion.model_copy(
                update={"schedule": name, "num_timesteps": num_timesteps})})
            for name in schedules}


@task(name="train_schedule", task_run_name="train-{config.diffusion.schedule}")
def train_schedule(config: PipelineConfig, experiment: str, parent_run_id: str, fingerprint: str | None = None) -> dict:
    """The whole pipeline for one schedule, as an MLflow child run of the comparison, on the data
    version `fingerprint` the flow prepared (a Dask worker on another host fetches it from the
    tracking store by that fingerprint: tasks.run_files.dataset)."""
    return run_pipeline(config, experiment, run_name=f"schedule-{config.diffusion.schedule}",
                        parent_run_id=parent_run_id, tags={"comparison.parent": parent_run_id},
                        fingerprint=fingerprint)


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per schedule, best first by the primary metric's direction (measures.MEASURES)."""
    rows = []
    for schedule, summary in results.items():
        evaluation = summary["evaluation"]
        metric = evaluation["metric"]
        features = parse_metric(metric)[1]
        rows.append({"schedule": schedule, "metric": metric, "num_samples": evaluation["num_samples"],
                     "fid": evaluation[metric], "fid_floor": evaluation.get(f"{metric}_floor"),
                     **{key: evaluation.get(f"{name}_{features}{suffix}")
                        for key, name, suffix in (("kid", "kid", ""), ("kid_std", "kid", "_std"),
                                                  ("precision", "precision", ""), ("recall", "recall", ""))},
                     "final_loss": summary["final_loss"], "images_per_second": summary["images_per_second"],
                     "steps": summary["steps"], "run_id": summary["run_id"]})
    metrics = {row["metric"] for row in rows}
    if len(metrics) > 1:   # the schedules share one configuration: one protocol
        raise ValueError(f"the schedules were measured with different metrics {sorted(metrics)}: not comparable")
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    ranked = measure_of(rows[0]["metric"]).ranked(range(len(rows)), lambda i: rows[i]["fid"]) if rows else []
    return table.iloc[ranked].reset_index(drop=True)


@flow(name="train_schedules", log_prints=True)
def train_schedules(configs: dict[str, PipelineConfig], experiment: str, parent_run_id: str,
                    fingerprint: str | None = None) -> dict[str, dict]:
    """One pipeline per schedule, all submitted at once to this subflow's task runner (set by the
    caller with `.with_options(task_runner=...)`), whose capacity bounds how many run together."""
    futures = {name: train_schedule.submit(config, experiment, parent_run_id, fingerprint)
               for name, config in configs.items()}
    return {name: future.result() for name, future in futures.items()}


@flow(name="compare_schedules", log_prints=True)
def compare_schedules(
    schedules: ScheduleList = ["linear", "cosine", "sigmoid"],  # noqa: B006 (pydantic copies it)
    num_timesteps: Annotated[int, Field(ge=1)] = 1000,
    data: DataParam = DEFAULTS.data,
    model: ModelParam = DEFAULTS.model,
    train: TrainParam = DEFAULTS.train,
    sampling: SamplingParam = DEFAULTS.sampling,
    fid_extractor: ExtractorKind = DEFAULTS.fid_extractor,
    rank_by: MeasureName = DEFAULTS.rank_by,
    experiment: ExperimentName = "ddpm-schedules",
    max_parallel: Annotated[int, Field(ge=1, le=64, description="pipelines training at once (threads, or "
                                                                "local Dask worker processes)")] = 1,
    promote_to: str | None = contract.DEFAULT_MODEL_NAME,
    dask_cluster: DaskCluster = None,
) -> pd.DataFrame:
    """Train, sample and score one model per noise schedule with everything else (seed included) equal.

    Logs to a parent MLflow run: comparison.csv / comparison.md (schedule, FID, floor, KID and its
    spread, precision, recall, final loss, images/s, steps, child run id), plots/schedules.png
    (alphas_cumprod of each schedule, FID in the legend) and plots/precision_recall.png (each
    schedule's precision against its recall: fidelity against diversity, which FID alone does not
    tell apart); the same table is a Prefect table artifact `schedule-comparison`.
    Returns the table, best first. Then the best run is offered to the registered model
    `promote_to` (None: no promotion), which moves its `champion` alias only if it is better.
    `dask_cluster` runs the pipelines on Dask (see DaskCluster).
    """
    base = PipelineConfig(data=data, model=model, train=train, sampling=sampling, fid_extractor=fid_extractor,
                          rank_by=rank_by)
    configs = schedule_configs(schedules, num_timesteps, base)
    runner = fan_out_runner(dask_cluster, max_parallel)
    check_config(base)   # the schedule changes nothing it checks
    home = settings.ddpm_home()
    # Prepared once here, so the concurrent pipelines all hit the cache instead of racing to write it.
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(data, out_dir=str(home / "data"))
    # Everything checkable is checked before any run exists or anything trains.
    manifest = read_manifest(dataset_path)
    check_evaluation(fid_extractor, manifest, sampling.num_images)
    validate_for_model(manifest, model.image_size, model.in_channels, model.num_classes)
    warm_scoring_cache(dataset_path, fid_extractor, sampling.num_images)   # built once, not once per pipeline
    run_files.publish_dataset(dataset_path)   # on a tracking server: workers on other hosts fetch it by fingerprint
    parent_run_id = start_run(experiment, None, {"schedules": schedules, "num_timesteps": num_timesteps,
                                                 "data": data.model_dump(mode="json"),
                                                 "model": model.model_dump(mode="json"),
                                                 "train": train.model_dump(mode="json"),
                                                 "sampling": sampling.model_dump(mode="json")},
                              tags={"comparison": "noise_schedule"})
    print(f"comparison: MLflow parent run {parent_run_id} in experiment '{experiment}'")
    with tracking.run_lifecycle(parent_run_id):
        results = train_schedules.with_options(task_runner=runner)(configs, experiment, parent_run_id,
                                                                   manifest["fingerprint"])
        table = comparison_table(results)
        log_comparison(parent_run_id, table, {name: config.diffusion for name, config in configs.items()})
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
    if table["precision"].notna().any():
        plots.log_figure(parent_run_id, lambda: plots.precision_recall_plot(table.to_dict(orient="records")),
                         "plots/precision_recall.png")
    best = table.iloc[0]
    tracking.client().set_tag(parent_run_id, "comparison.best_schedule", best.schedule)
    tracking.client().set_tag(parent_run_id, "comparison.metric", best.metric)
    tracking.client().log_metric(parent_run_id, "best_fid", float(best.fid))
    create_table_artifact(key="schedule-comparison", table=table.to_dict(orient="records"),
                          description=f"noise schedules compared in MLflow run {parent_run_id}, best first")
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
    from flows.prefect_server import prefect_api

    with prefect_api():
        compare_schedules()

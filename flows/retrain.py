"""retrain: the scheduled retraining entry point (the `retrain` deployment runs it on a cron schedule).

Re-prepares the data (free when nothing changed: the preparation task is cached on the config
and the source's identity), trains with the stored best configuration, samples and measures FID,
all in one MLflow run tagged with this flow run's id (so the triggered `evaluate` deployment
finds it, as it does for `train`).

The best configuration is the `config.json` of the FINISHED run of the experiment with the
lowest FID (`best_run_config`); with no such run yet, the pipeline's defaults.

    python -m flows.retrain
"""

from __future__ import annotations

from prefect import flow

from ddpm.data import DataConfig
from ddpm.training import PLACEMENT_FIELDS, TrainConfig
from flows.train_pipeline import ExperimentName, run_pipeline
from tasks import contract, tracking
from tasks.config import DEFAULTS, PipelineConfig, overlay
from tasks.registry import comparable_runs, promote_best


def best_run_config(experiment: str, metric: str | None = None) -> tuple[str, str, PipelineConfig] | None:
    """(run id, metric, configuration) of the best FINISHED train_pipeline run of `experiment`.

    Ranked by `metric` (default: the newest run's primary FID) among runs comparable with each
    other (tasks.registry.comparable_runs: same data and sample count). None when the experiment
    has no such run. Runs without a config.json (comparison parents, older runs) are skipped.
    """
    try:
        runs, criteria = comparable_runs([experiment], metric)
    except LookupError:
        return None
    for run in runs:
        try:
            stored = tracking.run_config(run)
        except FileNotFoundError:  # not a pipeline run
            continue
        return run.info.run_id, criteria["metric"], PipelineConfig.from_stored(stored)
    return None


@flow(name="retrain", log_prints=True)
def retrain(
    experiment: ExperimentName = contract.DEFAULT_EXPERIMENT,
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    metric: str | None = None,
    promote_to: str | None = contract.DEFAULT_MODEL_NAME,
) -> dict:
    """Retrain with the best configuration stored in `experiment` (lowest `metric`, by default the
    newest run's primary FID, among runs on the same data and sample count), on fresh data.

    `data` / `train` change the fields they name in the stored data or training settings (e.g.
    `train={"steps": 3000}`: more steps, everything else as the best run had it); the rest
    (model, schedule, sampling, FID extractor) comes from the best run, or from the defaults
    when the experiment has no finished run yet. Returns the pipeline's summary plus
    `based_on` (the run whose configuration was used, or None). Finally the best run is offered
    to the registered model `promote_to` (None: no promotion): `champion` moves only if it is better.
    """
    best = best_run_config(experiment, metric)
    if best is None:
        print(f"no finished run with {metric or 'an FID'} in experiment '{experiment}': training with the defaults")
        based_on, config = None, DEFAULTS
    else:
        based_on, metric, config = best
        print(f"best configuration: MLflow run {based_on} (ranked by {metric})")
    # where the best run trained (8 GPUs, two nodes) is not where this one runs: placement is this
    # deployment's (the defaults, then `train`); everything that shapes the model is the best run's
    placement = {name: getattr(DEFAULTS.train, name) for name in PLACEMENT_FIELDS}
    config = config.model_copy(update={
        "data": overlay(config.data, data),
        "train": overlay(TrainConfig(**{**config.train.model_dump(), **placement}), train),
    })
    summary = run_pipeline(
        config,
        experiment=experiment,
        run_name=None,
        tags={contract.RETRAIN_BASED_ON_TAG: based_on or "defaults"},
    )
    promotion = promote_best([experiment], promote_to) if promote_to else None
    return {**summary, "based_on": based_on, "promotion": promotion}


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        retrain()

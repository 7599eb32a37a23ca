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

import mlflow
from prefect import flow

from ddpm.data import DataConfig
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig
from flows.train_pipeline import (
    CONFIG_ARTIFACT, DEFAULT_DIFFUSION, DEFAULT_MODEL, DEFAULT_SAMPLING, DEFAULT_TRAIN, run_pipeline,
)
from tasks import tracking
from tasks.registry import comparable_runs, promote_best


def best_run_config(experiment: str, metric: str | None = None) -> tuple[str, str, dict] | None:
    """(run id, metric, config.json) of the best FINISHED train_pipeline run of `experiment`.

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
            config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
        except Exception:  # noqa: BLE001 (no config.json: not a pipeline run)
            continue
        return run.info.run_id, criteria["metric"], config
    return None


@flow(name="retrain", log_prints=True)
def retrain(
    experiment: str = "ddpm",
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    metric: str | None = None,
    promote_to: str | None = "ddpm",
) -> dict:
    """Retrain with the best configuration stored in `experiment` (lowest `metric`, by default the
    newest run's primary FID, among runs on the same data and sample count), on fresh data.

    `data` / `train` replace the stored data or training settings (e.g. more steps); the rest
    (model, schedule, sampling, FID extractor) comes from the best run, or from the defaults
    when the experiment has no finished run yet. Returns the pipeline's summary plus
    `based_on` (the run whose configuration was used, or None). Finally the best run is offered
    to the registered model `promote_to` (None: no promotion): `champion` moves only if it is better.
    """
    best = best_run_config(experiment, metric)
    if best is None:
        print(f"no finished run with {metric or 'an FID'} in experiment '{experiment}': training with the defaults")
        based_on, config = None, {}
    else:
        based_on, metric, config = best
        print(f"best configuration: MLflow run {based_on} (ranked by {metric})")
    summary = run_pipeline(
        data=data or (DataConfig.model_validate(config["data"]) if "data" in config else DataConfig()),
        model=UNetConfig.model_validate(config["model"]) if "model" in config else DEFAULT_MODEL,
        diffusion=DiffusionConfig.model_validate(config["diffusion"]) if "diffusion" in config else DEFAULT_DIFFUSION,
        train=train or (TrainConfig.model_validate(config["train"]) if "train" in config else DEFAULT_TRAIN),
        sampling=SamplerConfig.model_validate(config["sampling"]) if "sampling" in config else DEFAULT_SAMPLING,
        fid_extractor=config.get("fid_extractor", "auto"),
        experiment=experiment,
        run_name=None,
        tags={"retrain.based_on": based_on or "defaults"},
    )
    promotion = promote_best([experiment], promote_to) if promote_to else None
    return {**summary, "based_on": based_on, "promotion": promotion}


if __name__ == "__main__":
    retrain()

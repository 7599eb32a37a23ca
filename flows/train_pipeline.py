"""train_pipeline: prepare data -> train -> sample -> FID, all in one MLflow run per flow run.

    python -m flows.train_pipeline            # the built-in defaults: digits at 16x16, a tiny UNet
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from prefect import flow, runtime

from ddpm.data import DataConfig, load_prepared
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig, preset
from tasks import settings, tracking
from tasks.data import log_dataset_input, prepare_data
from tasks.evaluate import ExtractorKind, check_evaluation, evaluate_samples
from tasks.sample import sample_checkpoint
from tasks.train import train_model

# Defaults sized for a laptop CPU: a few minutes end to end on 2 cores.
DEFAULT_MODEL = preset("tiny-16")
# The small-model recipe was tuned by measurement (docs/benchmarks.md, "Recipe sweep"): at this
# size the cosine noise schedule, a learning rate 20x the paper's and a cosine decay of it to 0
# roughly halve the FID of the paper's recipe in the same minutes.
DEFAULT_DIFFUSION = DiffusionConfig(schedule="cosine")
DEFAULT_TRAIN = TrainConfig(
    steps=1500, batch_size=64, learning_rate=4e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999,
    log_every=25, checkpoint_every=500, keep_last=3,
)
# 350 samples: FID needs a reference (the holdout split) at least as large; the digits hold out 359.
DEFAULT_SAMPLING = SamplerConfig(num_images=350, batch_size=175)   # the default sampler (DDIM-50, eta 1)

# Named recipes: the settings that differ from the defaults above for one kind of run
# (`ddpm train --recipe NAME`; prefect.yaml's train-<NAME> deployments carry the same values).
RECIPES: dict[str, dict] = {
    "digits": {},   # the defaults: scikit-learn's 8x8 digits at 16x16, a few minutes on a laptop
    # MNIST at full size, the standard split: train on the 60,000, FID against the 10,000 test
    # images. 28x28 is padded to 32x32 (every pixel kept, no resampling blur; 32 halves twice
    # for the UNet's levels). ~15 min of training on 2 CPU cores (docs/benchmarks.md).
    "mnist": {
        "data": DataConfig(source="mnist", image_size=32, resize="pad", split="official"),
        "model": preset("tiny-32"),
        "train": TrainConfig(**{**DEFAULT_TRAIN.model_dump(), "steps": 2000}),
        "sampling": SamplerConfig(**{**DEFAULT_SAMPLING.model_dump(), "num_images": 1000, "batch_size": 250}),
    },
}

CHECKPOINT_DIR_TAG = "checkpoint_dir"
CONFIG_ARTIFACT = "config.json"


def start_run(experiment: str, run_name: str | None, params: dict, tags: dict | None = None) -> str:
    """Create the MLflow run of this flow run, tagged with the Prefect flow-run id."""
    mlflow_client = tracking.client()
    flow_run_id = runtime.flow_run.id
    run = mlflow_client.create_run(
        tracking.experiment_id(experiment),
        run_name=run_name or runtime.flow_run.name,
        tags={"prefect.flow_run_id": str(flow_run_id or ""), "prefect.flow_name": str(runtime.flow_run.flow_name or ""),
              **(tags or {})},
    )
    params = tracking.flatten_params(params)
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        mlflow_client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def run_pipeline(
    data: DataConfig,
    model: UNetConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    sampling: SamplerConfig,
    fid_extractor: ExtractorKind = "auto",
    experiment: str = "ddpm",
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """The body of train_pipeline, callable from any flow or task (compare_schedules, retrain).

    One MLflow run, tagged with the Prefect flow-run id of the caller; with `parent_run_id`, it
    is an MLflow child run of that run (the tag `mlflow.parentRunId` nests it in the UI).
    """
    home = settings.ddpm_home()
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(data, out_dir=str(home / "data"))
    dataset = load_prepared(Path(dataset_path))
    check_evaluation(fid_extractor, dataset, sampling.num_images)   # before the run exists or anything trains
    config = {"data": data.model_dump(mode="json"), "model": model.model_dump(mode="json"),
              "diffusion": diffusion.model_dump(mode="json"), "train": train.model_dump(mode="json"),
              "sampling": sampling.model_dump(mode="json"), "fid_extractor": fid_extractor}
    run_tags = {"dataset.fingerprint": dataset.fingerprint, "schedule": diffusion.schedule, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id = start_run(experiment, run_name, config, tags=run_tags)
    print(f"MLflow run {run_id} in experiment '{experiment}' at {settings.tracking_uri()}")
    try:
        mlflow.set_tracking_uri(settings.tracking_uri())
        with mlflow.start_run(run_id=run_id):
            log_dataset_input(dataset)
        out = settings.run_dir(run_id)
        checkpoint_dir = out / "checkpoints"
        # evaluate finds the checkpoints from these, even when its DDPM_HOME is another folder
        tracking.client().set_tag(run_id, CHECKPOINT_DIR_TAG, str(checkpoint_dir))
        tracking.log_dict(run_id, config, CONFIG_ARTIFACT)
        trained = train_model(dataset_path, model, diffusion, train, run_id, str(checkpoint_dir))
        samples = sample_checkpoint(trained["checkpoints"][-1], sampling, str(out / "samples"), run_id)
        evaluation = evaluate_samples(samples["npz"], dataset_path, run_id, samples["step"], fid_extractor)
    except BaseException:
        tracking.client().set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        tracking.client().set_tag(run_id, "error", traceback.format_exc(limit=3)[-4000:])
        raise
    tracking.client().set_terminated(run_id)
    summary = {"run_id": run_id, "dataset": dataset_path, "fingerprint": dataset.fingerprint, **trained,
               "samples": samples, "evaluation": evaluation}
    metric = evaluation["metric"]
    print(json.dumps({k: summary[k] for k in ("run_id", "final_loss", "images_per_second", "steps")}
                     | {metric: evaluation[metric], f"{metric}_floor": evaluation[f"{metric}_floor"]}, indent=1))
    print(f"sample grid: {samples['grid']}")
    return summary


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(
    data: DataConfig = DataConfig(),
    model: UNetConfig = DEFAULT_MODEL,
    diffusion: DiffusionConfig = DEFAULT_DIFFUSION,
    train: TrainConfig = DEFAULT_TRAIN,
    sampling: SamplerConfig = DEFAULT_SAMPLING,
    fid_extractor: ExtractorKind = "auto",
    experiment: str = "ddpm",
    run_name: str | None = None,
) -> dict:
    """Prepare the data (cached), train a UNet, sample, measure FID; track it all in one MLflow run.

    The samples (`sampling.num_images` of them, from the EMA weights of the last checkpoint) give
    both the grid picture and the FID against the holdout split. The run's full configuration is
    logged as `config.json` (retrain reads it back) and its checkpoint folder as the tag
    `checkpoint_dir` (evaluate reads it).
    """
    return run_pipeline(data, model, diffusion, train, sampling, fid_extractor, experiment, run_name)


if __name__ == "__main__":
    result = train_pipeline()
    sys.exit(0 if result else 1)

"""train_pipeline: prepare data -> train -> sample -> FID, all in one MLflow run per flow run.

    python -m flows.train_pipeline            # the built-in defaults: digits at 16x16, a tiny UNet
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow, runtime
from pydantic import BaseModel, BeforeValidator, Field

from ddpm.data import DataConfig, load_prepared, validate_for_model
from ddpm.diffusion import DiffusionConfig
from ddpm.distributed import check_num_processes
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import UNetConfig, preset
from tasks import settings, tracking
from tasks.data import log_dataset_input, prepare_data
from tasks.evaluate import ExtractorKind, check_evaluation, evaluate_samples, extractor_names, guidance_sweep
from tasks.registry import log_ddpm_model
from tasks.sample import sample_checkpoint
from tasks.train import train_model

# Defaults sized for a laptop CPU: a few minutes end to end on 2 cores.
DEFAULT_MODEL = preset("tiny-16")
# The small-model recipe was tuned by measurement (docs/benchmarks.md, "Recipe sweep"): at this
# size the cosine noise schedule, a learning rate 20x the paper's and a cosine decay of it to 0
# roughly halve the FID of the paper's recipe in the same minutes; Min-SNR-5 loss weighting then
# lowers it by 15-35% more (two training seeds).
DEFAULT_DIFFUSION = DiffusionConfig(schedule="cosine", min_snr_gamma=5.0)
DEFAULT_TRAIN = TrainConfig(
    steps=1500, batch_size=64, learning_rate=4e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999,
    log_every=25, checkpoint_every=500, keep_last=3,
)
# 350 samples: FID needs a reference (the holdout split) at least as large; the digits hold out 359.
DEFAULT_SAMPLING = SamplerConfig(num_images=350, batch_size=175)   # the default sampler (DPM-Solver++ 2M SDE, 20 steps)


def partial_over(base: BaseModel) -> BeforeValidator:
    """Flow-parameter metadata: a JSON object given for the parameter (a deployment's --param, the
    Prefect UI, the CLI) changes only the fields it names; the others keep `base`'s values (the
    pipeline's tuned defaults), not the class's own (the paper's). Objects pass as they are."""
    def merge(value):
        return {**base.model_dump(), **value} if isinstance(value, dict) else value
    return BeforeValidator(merge)


# The types of the flows' section parameters: `--param train='{"steps": 3000}'` is the tuned
# recipe with 3000 steps, not TrainConfig(steps=3000) with the paper's batch and learning rate.
DataParam = Annotated[DataConfig, partial_over(DataConfig())]
ModelParam = Annotated[UNetConfig, partial_over(DEFAULT_MODEL)]
DiffusionParam = Annotated[DiffusionConfig, partial_over(DEFAULT_DIFFUSION)]
TrainParam = Annotated[TrainConfig, partial_over(DEFAULT_TRAIN)]
SamplingParam = Annotated[SamplerConfig, partial_over(DEFAULT_SAMPLING)]
ExperimentName = Annotated[str, Field(min_length=1, description="MLflow experiment")]

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
    # The defaults, class-conditional: one model for the ten digits, sampled with classifier-free
    # guidance; the run adds conditional accuracy and the guidance sweep (docs/benchmarks.md).
    "digits-conditional": {"model": preset("tiny-16", num_classes=10)},
}

# Re-exported: where a run keeps its configuration and checkpoint folder (tasks.tracking).
CHECKPOINT_DIR_TAG, CONFIG_ARTIFACT = tracking.CHECKPOINT_DIR_TAG, tracking.CONFIG_ARTIFACT
CONDITIONAL_TAG = tracking.CONDITIONAL_TAG
SECTIONS = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
            "sampling": SamplerConfig}


def start_run(experiment: str, run_name: str | None, params: dict, tags: dict | None = None) -> str:
    """Create the MLflow run of this flow run, tagged with the Prefect flow-run id."""
    tracking.mark_vanished_runs(experiment)   # runs whose process was killed outright: FAILED, not RUNNING
    return tracking.create_run(
        experiment, run_name or runtime.flow_run.name, params,
        tags={"prefect.flow_run_id": str(runtime.flow_run.id or ""),
              "prefect.flow_name": str(runtime.flow_run.flow_name or ""), **(tags or {})},
    )


def check_config(data: DataConfig, model: UNetConfig, fid_extractor: ExtractorKind = "auto",
                 sampling: SamplerConfig | None = None, train: TrainConfig | None = None) -> None:
    """The checks that need no data, for callers to run before anything starts (the CLI runs them
    before Prefect): the model's input matches the images, the FID extractor asked for is here,
    classes and guidance are asked only of a class-conditional model, within its classes, and
    this machine has a device for each training process asked for."""
    if (data.image_size, data.channels) != (model.image_size, model.in_channels):
        raise ValueError(
            f"the data is {data.image_size}x{data.image_size} with {data.channels} channel(s) but the model "
            f"takes {model.image_size}x{model.image_size} with {model.in_channels}: pick a model preset of that "
            f"size (--preset tiny-32 for 32x32) or --image-size {model.image_size}")
    if fid_extractor != "auto":
        extractor_names(fid_extractor, has_labels=True)   # the extra missing: said now, not after training
    if sampling is not None:
        sampling.class_labels(model.num_classes)
    if train is not None and train.world_size > 1:
        check_num_processes(train.num_processes, train.device)


def resumed_config(run_id: str, given: dict, defaults: dict) -> dict:
    """The configuration run `run_id` was started with, for resuming it.

    A section of `given` left at its default takes the stored one; a section set to anything
    else must equal the stored one: a resumed run is never trained half with one configuration
    and half with another (a ValueError lists the differences).
    """
    stored = tracking.run_config(tracking.find_run(run_id))
    config, changes = {}, []
    for name, value in given.items():
        if name == "fid_extractor":
            old = stored.get(name, "auto")
            if value not in (old, defaults[name]):
                changes.append(f"fid_extractor {old} -> {value}")
            config[name] = old
            continue
        old = SECTIONS[name].model_validate(stored[name])   # fills fields added since the run started
        if value not in (old, defaults[name]):
            new_fields, old_fields = value.model_dump(mode="json"), old.model_dump(mode="json")
            changes += [f"{name}.{key} {old_fields[key]!r} -> {new_fields[key]!r}"
                        for key in new_fields if new_fields[key] != old_fields[key]]
        config[name] = old
    if changes:
        raise ValueError(f"run {run_id} resumes with the configuration it was started with; "
                         f"not changing {', '.join(changes)}")
    return config


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
    resume_run_id: str | None = None,
) -> dict:
    """The body of train_pipeline, callable from any flow or task (compare_schedules, retrain).

    One MLflow run, tagged with the Prefect flow-run id of the caller; with `parent_run_id`, it
    is an MLflow child run of that run (the tag `mlflow.parentRunId` nests it in the UI). With
    `resume_run_id`, that unfinished run continues from its newest valid checkpoint (the caller
    passes the run's own configuration: `resumed_config`).
    """
    home = settings.ddpm_home()
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(data, out_dir=str(home / "data"))
    dataset = load_prepared(Path(dataset_path))
    # Everything checkable is checked before a run exists or anything trains.
    check_config(data, model, fid_extractor, sampling, train)
    check_evaluation(fid_extractor, dataset, sampling.num_images)
    validate_for_model(dataset, model.image_size, model.in_channels, model.num_classes)
    config = {"data": data.model_dump(mode="json"), "model": model.model_dump(mode="json"),
              "diffusion": diffusion.model_dump(mode="json"), "train": train.model_dump(mode="json"),
              "sampling": sampling.model_dump(mode="json"), "fid_extractor": fid_extractor}
    if resume_run_id:
        run = tracking.reopen_run(resume_run_id)
        run_id = run.info.run_id
        print(f"resuming MLflow run {run_id} from its newest valid checkpoint")
    else:
        run_tags = {"dataset.fingerprint": dataset.fingerprint, "schedule": diffusion.schedule,
                    CONDITIONAL_TAG: str(model.num_classes is not None).lower(), **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_id = start_run(experiment, run_name, config, tags=run_tags)
        print(f"MLflow run {run_id} in experiment '{experiment}' at {settings.tracking_uri()}")
    with tracking.run_lifecycle(run_id):
        out = settings.run_dir(run_id)
        if resume_run_id:
            checkpoint_dir = Path(run.data.tags.get(CHECKPOINT_DIR_TAG) or out / "checkpoints")
        else:
            checkpoint_dir = out / "checkpoints"
            log_dataset_input(run_id, dataset)
            # evaluate finds the checkpoints from these, even when its DDPM_HOME is another folder
            tracking.client().set_tag(run_id, CHECKPOINT_DIR_TAG, str(checkpoint_dir))
            tracking.log_dict(run_id, config, CONFIG_ARTIFACT)
        trained = train_model(dataset_path, model, diffusion, train, run_id, str(checkpoint_dir))
        final = trained["checkpoints"][-1]
        # the run's model (MLflow 3 LoggedModel, the EMA weights), its FIDs linked to it; promotion
        # registers this model rather than logging it again
        model_id = log_ddpm_model(run_id, final).model_id
        samples = sample_checkpoint(final, sampling, str(out / "samples"), run_id)
        evaluation = evaluate_samples(samples["npz"], dataset_path, run_id, samples["step"], fid_extractor,
                                      model_id=model_id)
        if model.num_classes is not None:   # FID and conditional accuracy against the guidance scale
            evaluation["guidance_sweep"] = guidance_sweep(final, sampling, dataset_path, run_id,
                                                          extractor=fid_extractor)
    summary = {"run_id": run_id, "dataset": dataset_path, "fingerprint": dataset.fingerprint,
               "conditional": model.num_classes is not None, **trained,
               "samples": samples, "evaluation": evaluation}
    metric = evaluation["metric"]
    print(json.dumps({k: summary[k] for k in ("run_id", "final_loss", "images_per_second", "steps")}
                     | {metric: evaluation[metric], f"{metric}_floor": evaluation[f"{metric}_floor"]}, indent=1))
    print(f"sample grid: {samples['grid']}")
    return {**summary, "model_id": model_id}


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(
    data: DataParam = DataConfig(),
    model: ModelParam = DEFAULT_MODEL,
    diffusion: DiffusionParam = DEFAULT_DIFFUSION,
    train: TrainParam = DEFAULT_TRAIN,
    sampling: SamplingParam = DEFAULT_SAMPLING,
    fid_extractor: ExtractorKind = "auto",
    experiment: ExperimentName = "ddpm",
    run_name: str | None = None,
    resume: str | None = None,
) -> dict:
    """Prepare the data (cached), train a UNet, sample, measure FID; track it all in one MLflow run.

    `resume`: the MLflow run id of an unfinished (crashed, killed) run to continue in that same
    run, from its newest valid checkpoint, with the configuration it was started with; the
    other arguments may be left out (or must equal that configuration).

    The samples (`sampling.num_images` of them, from the EMA weights of the last checkpoint) give
    both the grid picture and the FID against the holdout split. The run's full configuration is
    logged as `config.json` (retrain reads it back) and its checkpoint folder as the tag
    `checkpoint_dir` (evaluate reads it).
    """
    given = {"data": data, "model": model, "diffusion": diffusion, "train": train, "sampling": sampling,
             "fid_extractor": fid_extractor}
    if resume:
        defaults = {"data": DataConfig(), "model": DEFAULT_MODEL, "diffusion": DEFAULT_DIFFUSION,
                    "train": DEFAULT_TRAIN, "sampling": DEFAULT_SAMPLING, "fid_extractor": "auto"}
        given = resumed_config(resume, given, defaults)
    return run_pipeline(**given, experiment=experiment, run_name=run_name, resume_run_id=resume)


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        result = train_pipeline()
    sys.exit(0 if result else 1)

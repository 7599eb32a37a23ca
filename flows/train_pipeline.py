"""train_pipeline: prepare data -> train -> sample -> FID, all in one MLflow run per flow run.

    python -m flows.train_pipeline            # the built-in defaults: digits at 16x16, a tiny UNet

Its settings are one tasks.config.PipelineConfig; the flow's parameters are its sections.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator

from prefect import flow, runtime
from pydantic import AfterValidator, Field

from ddpm.data import load_prepared, validate_for_model
from ddpm.disk import DiskFull, free_bytes, full_disk_error, mib
from ddpm.errors import one_line
from ddpm.metrics.scoring import ExtractorKind, check_evaluation, extractor_names
from ddpm.torchrun import check_num_processes
from ddpm.training import check_checkpoint_dir, check_compiler, check_device, check_warm_start, resolve_device
from tasks import contract, run_files, settings, tracking
from tasks.config import (
    DEFAULTS, DataParam, DiffusionParam, MeasureName, ModelParam, PipelineConfig, SamplingParam, TrainParam,
)
from tasks.data import log_dataset_input, prepare_data
from tasks.evaluate import evaluate_samples, guidance_sweep
from tasks.sample import sample_checkpoint
from tasks.serving import log_ddpm_model
from tasks.train import train_model

ExperimentName = Annotated[str, Field(min_length=1, description="MLflow experiment"),
                           AfterValidator(tracking.check_experiment_name)]
NEARLY_FULL_BYTES = 64 << 20   # below this, a full disk met in a run is said to be DDPM_HOME's


def start_run(experiment: str, run_name: str | None, params: dict, tags: dict | None = None) -> str:
    """Create the MLflow run of this flow run, tagged with the Prefect flow-run id."""
    tracking.mark_vanished_runs(experiment)   # runs whose process was killed outright: FAILED, not RUNNING
    return tracking.create_run(
        experiment, run_name or runtime.flow_run.name, params,
        tags={contract.FLOW_RUN_TAG: str(runtime.flow_run.id or ""),
              contract.FLOW_NAME_TAG: str(runtime.flow_run.flow_name or ""), **(tags or {})},
    )


def check_config(config: PipelineConfig) -> None:
    """The checks that need no data, for callers to run before anything starts (the CLI runs them
    before Prefect): the model's input matches the images, the FID extractor asked for is here,
    classes and guidance are asked only of a class-conditional model, within its classes,
    this machine has the device asked for, a warm start's checkpoint is there and fits the model, one for each training process, and a C++ compiler when
    compiling on the CPU."""
    data, model, train = config.data, config.model, config.train
    if (data.image_size, data.channels) != (model.image_size, model.in_channels):
        raise ValueError(
            f"the data is {data.image_size}x{data.image_size} with {data.channels} channel(s) but the model "
            f"takes {model.image_size}x{model.image_size} with {model.in_channels}: pick a model preset of that "
            f"size (--preset tiny-32 for 32x32) or --image-size {model.image_size}")
    if config.fid_extractor != "auto":
        extractor_names(config.fid_extractor, has_labels=True)   # the extra missing: said now, not after training
    config.sampling.class_labels(model.num_classes)
    check_device(train.device)
    if train.init_from:   # a warm start that cannot work fails now, not as a FAILED run per try
        check_warm_start(train.init_from, model, config.diffusion)
    if train.world_size > 1:
        check_num_processes(train.num_processes, train.device)
    if train.compile:
        check_compiler(resolve_device(train.device))


def check_disk_space(config: PipelineConfig, runs: int = 1) -> None:
    """DiskFull, before new runs exist, when DDPM_HOME's disk cannot hold the checkpoints of
    `runs` runs of `config` at its retention (compare trains one per schedule, and all are kept;
    a resume is checked by the Trainer, counting the checkpoints it has)."""
    # space only: the run's own folder is made, and checked writable by the Trainer, once the run
    # exists (a failure there is the run's, FAILED with its reason)
    check_checkpoint_dir(settings.ddpm_home() / "runs", config.model, config.train, runs=runs, writable=False,
                         hint="; free space, keep fewer checkpoints (--set train.keep_last=1) or set DDPM_HOME "
                              "to a larger disk")


def check_batch_fits(train, manifest: dict) -> None:
    """A ValueError, before any run exists, when one batch needs more images than the train split has."""
    count = manifest["splits"]["train"]
    if train.batch_size > count:
        raise ValueError(f"train.batch_size {train.batch_size} is larger than the {count} training images of "
                         f"{manifest['source']}: lower it (--batch-size) or use more data")


@contextmanager
def disk_full_resumable(run_id: str) -> Iterator[None]:
    """A full disk met anywhere in the block (a checkpoint, the MLflow store, samples) as one
    DiskFull line saying what to do: free space, then resume the run, which continues from its
    newest checkpoint (all the ones written are intact: they are written atomically)."""
    try:
        yield
    except Exception as error:
        cause = full_disk_error(error)
        if cause is None:
            raise
        if not isinstance(cause, DiskFull):   # sqlite's, the C library's, or a worker's DiskFull as text
            text = one_line(str(cause).split("\n", 1)[0] or cause)
            home = settings.ddpm_home()
            free = free_bytes(home)
            where = (f"the disk holding {home} is full ({mib(free)} free)" if free < NEARLY_FULL_BYTES
                     else "a disk is full")
            cause = text if "diskfull:" in text.lower() else f"{where}: {text}"
        raise DiskFull(f"{cause}. Free space, then continue the run: ddpm train --resume {run_id}") from error


def resumed_config(run_id: str, given: PipelineConfig) -> PipelineConfig:
    """The configuration run `run_id` was started with, for resuming it.

    A section of `given` left at its default takes the stored one; a section set to anything
    else must equal the stored one: a resumed run is never trained half with one configuration
    and half with another (a ValueError lists the differences).
    """
    stored = PipelineConfig.from_stored(tracking.run_config(tracking.find_run(run_id)))
    changes = [change for name in PipelineConfig.model_fields
               if getattr(given, name) not in (getattr(stored, name), getattr(DEFAULTS, name))
               for change in stored.differences(stored.model_copy(update={name: getattr(given, name)}))]
    if changes:
        raise ValueError(f"run {run_id} resumes with the configuration it was started with; "
                         f"not changing {', '.join(changes)}")
    return stored


def run_pipeline(
    config: PipelineConfig,
    experiment: str = contract.DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    force_resume: bool = False,
    fingerprint: str | None = None,
) -> dict:
    """The body of train_pipeline, callable from any flow or task (compare_schedules, retrain).

    One MLflow run, tagged with the Prefect flow-run id of the caller; with `parent_run_id`, it
    is an MLflow child run of that run (the tag `mlflow.parentRunId` nests it in the UI). With
    `resume_run_id`, that unfinished run continues from its newest valid checkpoint (the caller
    passes the run's own configuration: `resumed_config`). With `fingerprint`, the caller prepared
    the data (and published it, on a tracking server): this host takes that version, by
    fingerprint, even where the source cannot be reached (tasks.run_files.dataset).
    """
    model, sampling, fid_extractor = config.model, config.sampling, config.fid_extractor
    home = settings.ddpm_home()
    if resume_run_id:   # the data it trained on, wherever this host is: here, in the store, or prepared
        dataset_path = run_files.run_dataset(tracking.find_run(resume_run_id), config.data)
    elif fingerprint:   # prepared by the caller on another host (a Dask worker's run): by fingerprint
        dataset_path = run_files.dataset(fingerprint, config.data)
    else:
        dataset_path = prepare_data.with_options(result_storage=home / "task-results")(config.data,
                                                                                     out_dir=str(home / "data"))
    dataset = load_prepared(Path(dataset_path))
    # Everything checkable is checked before a run exists or anything trains.
    check_config(config)
    check_evaluation(fid_extractor, dataset, sampling.num_images)
    validate_for_model(dataset, model.image_size, model.in_channels, model.num_classes)
    check_batch_fits(config.train, dataset.manifest)
    if resume_run_id:
        run = tracking.reopen_run(resume_run_id, force=force_resume)
        run_id = run.info.run_id
        print(f"resuming MLflow run {run_id} from its newest valid checkpoint")
    else:
        check_disk_space(config)
        run_tags = {contract.DATASET_FINGERPRINT_TAG: dataset.fingerprint, contract.SCHEDULE_TAG: config.diffusion.schedule,
                    contract.CONDITIONAL_TAG: str(model.num_classes is not None).lower(), **(tags or {})}
        if parent_run_id:
            run_tags[contract.PARENT_RUN_TAG] = parent_run_id
        run_id = start_run(experiment, run_name, config.to_stored(), tags=run_tags)
        uri = settings.tracking_uri()
        print(f"MLflow run {run_id} in experiment '{experiment}' at {settings.redact(uri)}"
              + (f": {tracking.ui_url(settings.redact(uri), tracking.experiment_id(experiment), run_id)}"
                 if uri.startswith(("http://", "https://")) else ""))
    with disk_full_resumable(run_id), tracking.run_lifecycle(run_id):
        out = settings.run_dir(run_id)
        if resume_run_id:
            # the newest valid checkpoint on this host, else the newest that reached the store (a run
            # continued on another host), fetched and verified
            found = run_files.newest_valid_checkpoint(run)
            checkpoint_dir = found.parent if found else run_files.local_folder(run)
        else:
            checkpoint_dir = out / "checkpoints"
            log_dataset_input(run_id, dataset)
            tracking.log_dict(run_id, config.to_stored(), contract.CONFIG_ARTIFACT)
            run_files.publish_dataset(dataset_path)   # hosts that cannot reach the source find it by fingerprint
        # the folder it trains in on this host (readers here use it; other hosts fetch from the store)
        tracking.client().set_tag(run_id, contract.CHECKPOINT_DIR_TAG, str(checkpoint_dir))
        trained = train_model(dataset_path, model, config.diffusion, config.train, run_id, str(checkpoint_dir))
        final = trained["checkpoints"][-1]
        # the run's model (MLflow 3 LoggedModel, the EMA weights), its FIDs linked to it; promotion
        # registers this model rather than logging it again
        model_id = log_ddpm_model(run_id, final).model_id
        samples = sample_checkpoint(final, sampling, str(out / "samples"), run_id)
        evaluation = evaluate_samples(samples["npz"], dataset_path, run_id, samples["step"], fid_extractor,
                                      model_id=model_id, sampler=sampling.describe(), rank_by=config.rank_by)
        if model.num_classes is not None:   # FID and conditional accuracy against the guidance scale
            evaluation["guidance_sweep"] = guidance_sweep(final, sampling, dataset_path, run_id,
                                                          extractor=fid_extractor)
    summary = {"run_id": run_id, "dataset": dataset_path, "fingerprint": dataset.fingerprint,
               "conditional": model.num_classes is not None, **trained,
               "samples": samples, "evaluation": evaluation}
    fids = {key: evaluation[key] for name in evaluation["metrics"] for key in (name, f"{name}_floor")}
    print(json.dumps({k: summary[k] for k in ("run_id", "final_loss", "images_per_second", "steps")} | fids, indent=1))
    print(f"sample grid: {samples['grid']}")
    return {**summary, "model_id": model_id}


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(
    data: DataParam = DEFAULTS.data,
    model: ModelParam = DEFAULTS.model,
    diffusion: DiffusionParam = DEFAULTS.diffusion,
    train: TrainParam = DEFAULTS.train,
    sampling: SamplingParam = DEFAULTS.sampling,
    fid_extractor: ExtractorKind = DEFAULTS.fid_extractor,
    rank_by: MeasureName = DEFAULTS.rank_by,
    experiment: ExperimentName = contract.DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    resume: str | None = None,
    force_resume: bool = False,
) -> dict:
    """Prepare the data (cached), train a UNet, sample, measure FID; track it all in one MLflow run.

    The first seven parameters are the settings of tasks.config.PipelineConfig, with its defaults;
    a JSON object for a section changes only the fields it names.

    `resume`: the MLflow run id of an unfinished (crashed, killed) run to continue in that same
    run, from its newest valid checkpoint, with the configuration it was started with; the
    other arguments may be left out (or must equal that configuration). A run still RUNNING
    (its process alive on this host, or on another host that cannot be asked) is refused unless
    `force_resume` declares it dead (a preempted node, a PID reused after a reboot): recorded on
    the run as the tag `resume.forced`.

    The samples (`sampling.num_images` of them, from the EMA weights of the last checkpoint) give
    both the grid picture and the FID against the holdout split. The run's full configuration is
    logged as `config.json` (retrain, evaluate and resume read it back) and its checkpoint folder
    as the tag `checkpoint_dir`.
    """
    config = PipelineConfig(data=data, model=model, diffusion=diffusion, train=train, sampling=sampling,
                            fid_extractor=fid_extractor, rank_by=rank_by)
    if resume:
        config = resumed_config(resume, config)
    elif force_resume:
        raise ValueError("force_resume declares a run dead to resume it: give the run (resume=RUN_ID)")
    return run_pipeline(config, experiment=experiment, run_name=run_name, resume_run_id=resume,
                        force_resume=force_resume)


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        result = train_pipeline()
    sys.exit(0 if result else 1)

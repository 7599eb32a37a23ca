"""evaluate: FID of every checkpoint of a finished training run, logged to that same MLflow run.

The run is found by its MLflow run id or by the Prefect flow run that trained it (the form a
deployment trigger passes, "prefect.flow-run.<uuid>", is accepted). Each checkpoint is sampled
with the run's own sampling settings (unless others are given) and scored against the holdout
split, so `fid_<extractor>` becomes a curve over training steps in the run; the tag
`fid.best_step` names the best checkpoint.

With `posthoc_ema` (a run trained with train.posthoc_ema), it also reconstructs the EMA of each
width in a sweep from the run's snapshots (ddpm.posthoc_ema, EDM2), scores each the same way,
logs the width -> FID table and plot, and keeps the best reconstruction as a model of the run
when it beats the run's own EMA: promotion registers that one (tasks.posthoc).

    python -m flows.evaluate <mlflow-run-id>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import mlflow
from prefect import flow, runtime
from pydantic import Field

from ddpm.checkpoint import checkpoint_step
from ddpm.data import read_manifest
from ddpm.metrics.measures import DEFAULT_MEASURE, measure_of
from ddpm.metrics.scoring import ExtractorKind, check_evaluation
from ddpm.posthoc_ema import PosthocEMAError, list_snapshots, sigma_rel_to_gamma, snapshot_steps
from ddpm.samplers import SamplerConfig
from flows.runners import DaskCluster, fan_out_runner
from tasks import contract, run_files, settings, tracking
from tasks.config import PipelineConfig, overlay
from tasks.evaluate import evaluate_samples
from tasks.posthoc import DEFAULT_SIGMA_RELS, log_posthoc_sweep, score_posthoc_width
from tasks.sample import sample_checkpoint


class NoCheckpointsError(FileNotFoundError):
    """The training run has no checkpoint on disk to evaluate."""


def checkpoints_of(run: mlflow.entities.Run) -> list[Path]:
    """The run's checkpoints, here or fetched from its artifact store (tasks.run_files);
    NoCheckpointsError when neither has any."""
    if found := run_files.checkpoints(run):
        return found
    folders = ", ".join(map(str, run_files.checkpoint_folders(run)))
    raise NoCheckpointsError(f"MLflow run {run.info.run_id} has no checkpoints to evaluate (looked in {folders} "
                             "and in its artifact store)")


SigmaRels = Annotated[list[float], Field(min_length=1, description="post-hoc EMA widths (sigma_rel) to reconstruct")]


@flow(name="posthoc_ema_sweep", log_prints=True)
def posthoc_ema_sweep(checkpoint_dir: str, sigma_rels: list[float], steps: list[int | None],
                      sampling: SamplerConfig, dataset_path: str, extractor: str, out_dir: str,
                      rank_by: str = DEFAULT_MEASURE) -> list[dict]:
    """Score every (width, step), all submitted at once to this subflow's task runner (set by the
    caller: threads, or Dask workers)."""
    futures = [score_posthoc_width.submit(checkpoint_dir, sigma_rel, step, sampling, dataset_path, extractor, out_dir,
                                          rank_by)
               for step in steps for sigma_rel in sigma_rels]
    rows = [future.result() for future in futures]
    for row in rows:
        if "skipped" in row:
            print(f"sigma_rel {row['sigma_rel']:g}: skipped ({row['skipped']})")
        else:
            print(f"sigma_rel {row['sigma_rel']:g} at step {row['step']}: {row['metric']} = {row[row['metric']]:.3f}")
    return rows


@flow(name="evaluate", log_prints=True)
def evaluate(
    mlflow_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
    sampling: SamplerConfig | None = None,
    fid_extractor: ExtractorKind | None = None,
    posthoc_ema: bool | None = None,
    posthoc_sigma_rels: SigmaRels | None = None,
    posthoc_steps: list[int] | None = None,
    dask_cluster: DaskCluster = None,
    max_parallel: Annotated[int, Field(ge=1, le=64, description="post-hoc EMA widths scored at once")] = 1,
) -> dict:
    """FID of each checkpoint of one training run, logged as `fid_<extractor>` at its step in that run.

    Give exactly one of `mlflow_run_id` and `prefect_flow_run_id` ("<uuid>" or
    "prefect.flow-run.<uuid>"). `sampling` and `fid_extractor` default to the run's own settings;
    a partial `sampling` (`{"sampler": "ddim"}`) changes only the fields it names of the run's
    (tasks.config.overlay: the sample count stays the run's). Measured another way than the run
    measured itself (another sampler, count or extractor), the FIDs are logged under names that
    say how (`evaluate.<sampler>-n<count>.<extractor kind>.fid_<extractor>`) and the run's comparability tags
    (fid.metric, fid.num_samples, fid.sampler), which promotion ranks by, stay as training wrote them.

    `posthoc_ema` sweeps the EMA widths `posthoc_sigma_rels` (default tasks.posthoc.DEFAULT_SIGMA_RELS)
    at the snapshot steps `posthoc_steps` (default: the last), `max_parallel` at a time on the task
    runner `dask_cluster` picks (flows.runners), with the run's own protocol (its choice decides the
    model the run ships); its result is under "posthoc_ema". None: when the run kept snapshots and
    is measured its own way, so the deployment triggered by a training sweeps every run trained
    with train.posthoc_ema.
    Returns {"run_id", "metric", "fids": {step: fid}, "best_step", "protocol"}.
    """
    if bool(mlflow_run_id) == bool(prefect_flow_run_id):
        raise ValueError("give exactly one of mlflow_run_id and prefect_flow_run_id")
    # Every check comes before the first write: a bad request leaves every run as it was.
    run = tracking.find_run(mlflow_run_id, prefect_flow_run_id)
    run_id = run.info.run_id
    if run.data.tags.get(contract.RETRAIN_DECISION_TAG) == "skipped":   # a retrain that trained nothing
        print(f"MLflow run {run_id} records a skipped retrain: nothing to evaluate")
        return {"run_id": run_id, "metric": None, "fids": {}, "best_step": None, "protocol": None,
                "skipped": run.data.tags.get(contract.RETRAIN_REASON_TAG, "skipped")}
    checkpoints = checkpoints_of(run)
    config = PipelineConfig.from_stored(tracking.run_config(run))
    sampling = overlay(config.sampling, sampling)
    extractor = fid_extractor or config.fid_extractor
    own = sampling == config.sampling and extractor == config.fid_extractor
    if posthoc_ema is None:
        posthoc_ema = own and config.train.posthoc_ema and bool(list_snapshots(run_files.snapshot_folder(run)))
    elif posthoc_ema:
        run_files.snapshot_folder(run)   # here, or fetched from the store
    if posthoc_ema and not own:
        raise ValueError("the post-hoc EMA sweep chooses the model the run ships, so it measures with the run's own "
                         "sampling and FID extractor: drop `sampling` / `fid_extractor` (or sweep in another call)")
    # the run ranks by its own metric's measure (tag fid.metric: FID unless it chose another)
    own_metric = run.data.tags.get(contract.FID_METRIC_TAG)
    rank_by = measure_of(own_metric).key if own and own_metric else DEFAULT_MEASURE
    if posthoc_ema:
        posthoc_steps = check_posthoc(checkpoints[-1].parent, posthoc_sigma_rels, posthoc_steps, run_id,
                                      [checkpoint_step(c) for c in checkpoints])
        runner = fan_out_runner(dask_cluster, max_parallel)
    print(f"evaluating {len(checkpoints)} checkpoints of MLflow run {run_id} with {sampling.describe()}")

    dataset_path = run_files.run_dataset(run, config.data)   # the data it trained on: here, fetched, or prepared
    check_evaluation(extractor, read_manifest(dataset_path), sampling.num_images)
    prefix = "" if own else protocol_prefix(sampling, extractor)
    if not own:
        print(f"not the run's own protocol: FIDs logged as {prefix}fid_..., the run's comparability tags kept")
    out_dir = settings.run_dir(run_id) / "evaluation"
    fids: dict[int, float] = {}
    metric = None
    for checkpoint in checkpoints:
        samples = sample_checkpoint(str(checkpoint), sampling, str(out_dir), run_id)
        result = evaluate_samples(samples["npz"], dataset_path, run_id, samples["step"], extractor,
                                  sampler=sampling.describe(), metric_prefix=prefix, rank_by=rank_by)
        metric = result["metric"]
        fids[samples["step"]] = result[metric]
        print(f"step {samples['step']}: {metric} = {result[metric]:.3f}")

    best_step = measure_of(metric).best(fids, fids.get)   # in the metric's direction
    mlflow_client = tracking.client()
    mlflow_client.log_batch(run_id, metrics=[tracking.Metric(prefix + metric + contract.BEST_SUFFIX, fids[best_step],
                                                             int(time.time() * 1000), best_step)])
    mlflow_client.set_tag(run_id, prefix + contract.FID_BEST_STEP_TAG, str(best_step))
    mlflow_client.set_tag(run_id, contract.EVALUATE_FLOW_RUN_TAG, str(runtime.flow_run.id or ""))
    summary = {"run_id": run_id, "metric": metric, "fids": fids, "best_step": best_step,
               "protocol": prefix.rstrip(".") or "the run's own"}
    if posthoc_ema:
        sigma_rels = list(posthoc_sigma_rels or DEFAULT_SIGMA_RELS)
        print(f"post-hoc EMA: {len(sigma_rels)} widths x {len(posthoc_steps)} step(s), each sampled and scored "
              f"like the checkpoints")
        rows = posthoc_ema_sweep.with_options(task_runner=runner)(
            str(checkpoints[-1].parent), sigma_rels, posthoc_steps, sampling, dataset_path, extractor,
            str(settings.run_dir(run_id)), rank_by)
        # each reconstruction meets the run's own EMA at its own step (its checkpoint, scored above)
        choice = log_posthoc_sweep(run_id, rows, fids, config.train.ema_decay, config.train.ema_warmup)
        best = choice["best"]
        print(f"post-hoc EMA: best sigma_rel {best['sigma_rel']:g} at step {best['step']}: {metric} "
              f"{best[metric]:.3f} against the run's own EMA's {choice['fixed']:.3f} at the same step: "
              + ("logged as a model of the run; promotion registers it" if choice["chosen"] == "reconstruction"
                 else "the run's own EMA stays its model"))
        summary["posthoc_ema"] = choice
    return summary


def check_posthoc(checkpoint_dir: Path, sigma_rels: list[float] | None, steps: list[int] | None,
                  run_id: str, checkpoint_steps: list[int] | None = None) -> list[int | None]:
    """The snapshot steps to sweep; PosthocEMAError (one line) before any work when the run kept no
    snapshots, a width is out of range, a step has no snapshot, or (`checkpoint_steps`: the steps
    of the run's checkpoints) no checkpoint of the run's own EMA to compare the reconstructions
    with at the same step (the default, the last snapshot, included)."""
    if not list_snapshots(checkpoint_dir):
        raise PosthocEMAError(f"MLflow run {run_id} kept no post-hoc EMA snapshots (in {checkpoint_dir}/posthoc-ema); "
                              "train with --set train.posthoc_ema=true to keep them")
    for sigma_rel in sigma_rels or ():
        sigma_rel_to_gamma(sigma_rel)
    saved = snapshot_steps(checkpoint_dir)
    missing = [step for step in steps or () if step not in saved]
    if missing:
        raise PosthocEMAError(f"no post-hoc EMA snapshot at step(s) {missing} of MLflow run {run_id}; its snapshots: "
                              f"{saved}")
    steps = list(steps) if steps else [saved[-1]]
    unmatched = [step for step in steps if checkpoint_steps is not None and step not in checkpoint_steps]
    if unmatched:
        both = sorted(set(saved) & set(checkpoint_steps))
        raise PosthocEMAError(
            f"no checkpoint of MLflow run {run_id}'s own EMA at post-hoc step(s) {unmatched} to compare the "
            f"reconstructions with (checkpoints at {sorted(checkpoint_steps)}): "
            + (f"sweep a step that has both (--posthoc-steps {both[-1]})" if both else
               "no step has both a snapshot and a checkpoint, so no reconstruction can be compared"))
    return steps


def protocol_prefix(sampling: SamplerConfig, extractor: str) -> str:
    """'evaluate.ddim-50-eta1-n64.auto.': the name part that says how an evaluation measured
    (MLflow metric names take letters, digits, _ - . / and spaces)."""
    described = sampling.describe().replace("+", "p")
    return f"evaluate.{described}-n{sampling.num_images}.{extractor}."


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        evaluate(mlflow_run_id=sys.argv[1])

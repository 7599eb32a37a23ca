"""evaluate: FID of every checkpoint of a finished training run, logged to that same MLflow run.

The run is found by its MLflow run id or by the Prefect flow run that trained it (the form a
deployment trigger passes, "prefect.flow-run.<uuid>", is accepted). Each checkpoint is sampled
with the run's own sampling settings (unless others are given) and scored against the holdout
split, so `fid_<extractor>` becomes a curve over training steps in the run; the tag
`fid.best_step` names the best checkpoint.

    python -m flows.evaluate <mlflow-run-id>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
from prefect import flow, runtime

from ddpm.data import read_manifest
from ddpm.metrics.scoring import ExtractorKind, check_evaluation
from ddpm.samplers import SamplerConfig
from tasks import contract, settings, tracking
from tasks.data import prepare_data
from tasks.config import PipelineConfig, overlay
from tasks.evaluate import evaluate_samples
from tasks.sample import sample_checkpoint


class NoCheckpointsError(FileNotFoundError):
    """The training run has no checkpoint on disk to evaluate."""


def checkpoints_of(run: mlflow.entities.Run) -> list[Path]:
    """The run's checkpoints (tracking.run_checkpoints); NoCheckpointsError when it has none."""
    if found := tracking.run_checkpoints(run):
        return found
    folders = ", ".join(map(str, tracking.checkpoint_folders(run)))
    raise NoCheckpointsError(f"MLflow run {run.info.run_id} has no checkpoints to evaluate (looked in {folders})")


@flow(name="evaluate", log_prints=True)
def evaluate(
    mlflow_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
    sampling: SamplerConfig | None = None,
    fid_extractor: ExtractorKind | None = None,
) -> dict:
    """FID of each checkpoint of one training run, logged as `fid_<extractor>` at its step in that run.

    Give exactly one of `mlflow_run_id` and `prefect_flow_run_id` ("<uuid>" or
    "prefect.flow-run.<uuid>"). `sampling` and `fid_extractor` default to the run's own settings;
    a partial `sampling` (`{"sampler": "ddim"}`) changes only the fields it names of the run's
    (tasks.config.overlay: the sample count stays the run's). Measured another way than the run
    measured itself (another sampler, count or extractor), the FIDs are logged under names that
    say how (`evaluate.<sampler>-n<count>.<extractor kind>.fid_<extractor>`) and the run's comparability tags
    (fid.metric, fid.num_samples, fid.sampler), which promotion ranks by, stay as training wrote them.
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
    print(f"evaluating {len(checkpoints)} checkpoints of MLflow run {run_id} with {sampling.describe()}")

    home = settings.ddpm_home()
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(config.data,
                                                                                 out_dir=str(home / "data"))
    check_evaluation(extractor, read_manifest(dataset_path), sampling.num_images)
    own = sampling == config.sampling and extractor == config.fid_extractor
    prefix = "" if own else protocol_prefix(sampling, extractor)
    if not own:
        print(f"not the run's own protocol: FIDs logged as {prefix}fid_..., the run's comparability tags kept")
    out_dir = settings.run_dir(run_id) / "evaluation"
    fids: dict[int, float] = {}
    metric = None
    for checkpoint in checkpoints:
        samples = sample_checkpoint(str(checkpoint), sampling, str(out_dir), run_id)
        result = evaluate_samples(samples["npz"], dataset_path, run_id, samples["step"], extractor,
                                  sampler=sampling.describe(), metric_prefix=prefix)
        metric = result["metric"]
        fids[samples["step"]] = result[metric]
        print(f"step {samples['step']}: {metric} = {result[metric]:.3f}")

    best_step = min(fids, key=fids.get)
    mlflow_client = tracking.client()
    mlflow_client.log_batch(run_id, metrics=[tracking.Metric(prefix + metric + contract.BEST_SUFFIX, fids[best_step],
                                                             int(time.time() * 1000), best_step)])
    mlflow_client.set_tag(run_id, prefix + contract.FID_BEST_STEP_TAG, str(best_step))
    mlflow_client.set_tag(run_id, contract.EVALUATE_FLOW_RUN_TAG, str(runtime.flow_run.id or ""))
    return {"run_id": run_id, "metric": metric, "fids": fids, "best_step": best_step,
            "protocol": prefix.rstrip(".") or "the run's own"}


def protocol_prefix(sampling: SamplerConfig, extractor: str) -> str:
    """'evaluate.ddim-50-eta1-n64.auto.': the name part that says how an evaluation measured
    (MLflow metric names take letters, digits, _ - . / and spaces)."""
    described = sampling.describe().replace("+", "p")
    return f"evaluate.{described}-n{sampling.num_images}.{extractor}."


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        evaluate(mlflow_run_id=sys.argv[1])

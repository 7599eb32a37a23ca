"""Promotion: register the best run by FID and move the `champion` alias only when it wins.

    comparable_runs     finished runs ranked by FID, only those measured alike (metric, data, samples, kind)
    promote_best        register the best one (its logged model) and decide whether it becomes champion

The served model itself (the pyfunc, its signature, logging it) is tasks.serving.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from ddpm.checkpoint import checkpoint_step
from tasks import contract, tracking
# Models registered before tasks.serving existed pickled a reference to tasks.registry.DDPMImageModel.
from tasks.serving import DDPMImageModel, log_ddpm_model  # noqa: F401

CHAMPION, DEFAULT_MODEL_NAME = contract.CHAMPION_ALIAS, contract.DEFAULT_MODEL_NAME


# --- promotion ------------------------------------------------------------------------------


def runs_with_fid(experiments: list[str]) -> list:
    """FINISHED runs of `experiments` that carry an FID (tag `fid.metric` and that metric), newest first."""
    mlflow_client = tracking.client()
    ids = [e.experiment_id for name in experiments if (e := mlflow_client.get_experiment_by_name(name))]
    if not ids:
        return []
    runs = mlflow_client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=5000,
                                     order_by=["attributes.end_time DESC"])
    return [r for r in runs if r.data.tags.get(contract.FID_METRIC_TAG) in r.data.metrics]


def is_conditional(run) -> str:
    """"true" for a class-conditional model's run, else "false" (runs from before the tag included)."""
    return run.data.tags.get(contract.CONDITIONAL_TAG, contract.TAG_DEFAULTS[contract.CONDITIONAL_TAG])


def comparable_runs(experiments: list[str] | str, metric: str | None = None, fingerprint: str | None = None,
                    num_samples: int | str | None = None, conditional: bool | None = None) -> tuple[list, dict]:
    """The FINISHED runs of `experiments` whose FIDs can be ranked against each other, best first,
    and what they share: one metric (features), one dataset fingerprint, one sample count, one
    kind of model (class-conditional or not: guided class-balanced samples and unconditional
    ones are different products). FID depends on all of these, so runs that differ in any are
    never compared. Each defaults to that of the newest run with an FID (with `metric`, when
    given). LookupError when none qualifies.
    """
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    runs = runs_with_fid(experiments)
    if not runs:
        raise LookupError(f"no finished run with an FID in experiment(s) {experiments}; train one first")
    metric = metric or runs[0].data.tags[contract.FID_METRIC_TAG]
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        raise LookupError(f"no finished run in {experiments} has the metric {metric}")
    fingerprint = fingerprint or runs[0].data.tags.get(contract.DATASET_FINGERPRINT_TAG)
    num_samples = str(num_samples or runs[0].data.tags.get(contract.FID_NUM_SAMPLES_TAG))
    kind = is_conditional(runs[0]) if conditional is None else str(bool(conditional)).lower()
    criteria = {"metric": metric, "fingerprint": fingerprint, "num_samples": num_samples, "conditional": kind}
    same = [r for r in runs if r.data.tags.get(contract.DATASET_FINGERPRINT_TAG) == fingerprint
            and r.data.tags.get(contract.FID_NUM_SAMPLES_TAG) == num_samples and is_conditional(r) == kind]
    if not same:
        what = "class-conditional" if kind == "true" else "unconditional"
        raise LookupError(f"no finished run of a {what} model in {experiments} has {metric} at {num_samples} "
                          f"samples on dataset {fingerprint}")
    return sorted(same, key=lambda r: r.data.metrics[metric]), criteria


def checkpoint_for_fid(run, metric: str) -> Path | None:
    """The checkpoint whose samples gave the run's `metric` (the step of it), else the newest one;
    found where evaluate finds them (tracking.run_checkpoints)."""
    checkpoints = tracking.run_checkpoints(run)
    if not checkpoints:
        return None
    history = tracking.client().get_metric_history(run.info.run_id, metric)
    step = max(history, key=lambda m: m.timestamp).step if history else None
    by_step = {checkpoint_step(p): p for p in checkpoints}
    return by_step.get(step, checkpoints[-1])


def register_logged_model(run, checkpoint: Path, model_name: str, max_images: int):
    """Register the model the training run logged of `checkpoint` (same step, same request bound)
    instead of logging it again; None when the run has no such model."""
    mlflow_client = tracking.client()
    step = str(checkpoint_step(checkpoint))
    models = mlflow_client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`{contract.LOGGED_STEP_TAG}` = '{step}' "
                      f"AND tags.`{contract.LOGGED_MAX_IMAGES_TAG}` = '{max_images}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        return None
    return mlflow.register_model(f"models:/{ready[0].model_id}", model_name)


def registered_version(model_name: str, run_id: str):
    """The version of `model_name` already registered from run `run_id`, or None."""
    versions = tracking.client().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def current_champion(model_name: str):
    try:
        return tracking.client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:  # no registered model, or no alias yet
        return None


def champion_decision(candidate_tags: dict, champion_tags: dict | None) -> tuple[bool, str]:
    """Whether the candidate version should take the `champion` alias, and why (or why not).

    Only FIDs measured on the same data (dataset fingerprint) with the same features (metric
    name) and the same number of samples are comparable. A champion measured otherwise is kept: replacing it would compare
    numbers that mean different things; move the alias by hand if the new data is the point. A
    class-conditional model never replaces an unconditional champion, nor the reverse (tag
    model.conditional): promote each kind into its own registered model.
    """
    if champion_tags is None:
        return True, "no champion yet"
    for key, what in contract.COMPARABILITY_TAGS:
        if champion_tags.get(key, contract.TAG_DEFAULTS.get(key)) != candidate_tags[key]:
            return False, (f"champion was measured with another {what} ({key} {champion_tags.get(key)!r} "
                           f"vs {candidate_tags[key]!r}); FIDs are not comparable, champion kept")
    new, old = float(candidate_tags[contract.VERSION_FID_TAG]), float(champion_tags[contract.VERSION_FID_TAG])
    if math.isnan(old) or new < old:
        return True, f"{candidate_tags[contract.FID_METRIC_TAG]} {new:.4g} beats the champion's {old:.4g}"
    word = "ties" if new == old else "is worse than"
    return False, f"{candidate_tags[contract.FID_METRIC_TAG]} {new:.4g} {word} the champion's {old:.4g}; champion kept"


def champion_tags(champion) -> dict:
    """The champion version's tags; a version registered before `fid.num_samples` was tagged
    takes it from its source run."""
    tags = dict(champion.tags)
    if contract.FID_NUM_SAMPLES_TAG not in tags and tags.get(contract.SOURCE_RUN_TAG):
        try:
            run = tracking.client().get_run(tags[contract.SOURCE_RUN_TAG])
            tags[contract.FID_NUM_SAMPLES_TAG] = run.data.tags.get(contract.FID_NUM_SAMPLES_TAG)
        except MlflowException:  # the source run was deleted: not comparable
            pass
    return tags


def promote_best(experiments: list[str] | str = contract.DEFAULT_EXPERIMENT, model_name: str = DEFAULT_MODEL_NAME,
                 fingerprint: str | None = None, metric: str | None = None, max_images: int = 64,
                 log=print, conditional: bool | None = None) -> dict:
    """Register the best run by FID as a version of `model_name`; move `champion` to it if it wins.

    Candidates: comparable_runs(experiments, metric, fingerprint, conditional=conditional):
    FINISHED runs with `metric` on data `fingerprint` at one sample count, of one kind of model
    (class-conditional or not), each by default that of the newest run with an FID. The best candidate is registered once (a run already registered reuses its version),
    its version tagged with fid, fid.metric, fid.num_samples, schedule, dataset.fingerprint and
    source_run_id, and the alias moves only when its FID is strictly lower than the champion's
    on the same data, metric and sample count. The decision and its reason go in the version's
    tags `promotion.decision`/`promotion.reason`.
    """
    # One promotion at a time per store on this machine: two at once registered one run twice.
    with tracking.store_lock("promote"):
        return _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional)


def _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional) -> dict:
    candidates, criteria = comparable_runs(experiments, metric, fingerprint, conditional=conditional)
    metric, fingerprint = criteria["metric"], criteria["fingerprint"]

    def fid_of(run) -> float:
        return float(run.data.metrics[metric])

    mlflow_client = tracking.client()
    skipped = []
    for run in candidates:  # the best one we can still register
        version = registered_version(model_name, run.info.run_id)
        if version is not None:
            break
        checkpoint = checkpoint_for_fid(run, metric)
        if checkpoint is None:
            skipped.append(run.info.run_id)
            log(f"run {run.info.run_id} ({metric} {fid_of(run):.4g}) has no checkpoint under "
                f"{', '.join(map(str, tracking.checkpoint_folders(run)))}; trying the next best")
            continue
        version = register_logged_model(run, checkpoint, model_name, max_images)
        if version is None:
            info = log_ddpm_model(run.info.run_id, checkpoint, model_name, max_images=max_images)
            version = mlflow_client.get_model_version(model_name, str(info.registered_model_version))
        break
    else:
        raise LookupError(f"none of the {len(candidates)} candidate runs has its checkpoint on this machine")

    tags = {contract.VERSION_FID_TAG: repr(fid_of(run)), contract.FID_METRIC_TAG: metric,
            contract.FID_NUM_SAMPLES_TAG: criteria["num_samples"], contract.DATASET_FINGERPRINT_TAG: fingerprint,
            contract.SCHEDULE_TAG: run.data.tags.get(contract.SCHEDULE_TAG, ""),
            contract.SOURCE_RUN_TAG: run.info.run_id, contract.CONDITIONAL_TAG: criteria["conditional"]}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version.version, key, value)

    champion = current_champion(model_name)
    if champion is not None and champion.version == version.version:
        moved, reason = False, "already the champion"
    else:
        moved, reason = champion_decision(tags, champion_tags(champion) if champion else None)
    if moved:
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, version.version)
    if not (champion is not None and champion.version == version.version):   # a repeat keeps its first reason
        mlflow_client.set_model_version_tag(model_name, version.version, contract.DECISION_TAG,
                                            CHAMPION if moved else "kept")
        mlflow_client.set_model_version_tag(model_name, version.version, contract.REASON_TAG, reason)
    champion_version = version.version if moved else (champion.version if champion else None)
    log(f"{model_name} version {version.version} (run {run.info.run_id}, {metric} {fid_of(run):.4g}): "
        f"{'now' if moved else 'not'} {CHAMPION}: {reason}")
    return {"model_name": model_name, "version": str(version.version), "run_id": run.info.run_id,
            "fid": fid_of(run), "metric": metric, "num_samples": criteria["num_samples"],
            "fingerprint": fingerprint, "conditional": criteria["conditional"] == "true", "moved": moved,
            "reason": reason, "champion_version": str(champion_version) if champion_version else None,
            "skipped_runs": skipped}

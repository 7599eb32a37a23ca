"""retrain: the scheduled retraining entry point (the `retrain` deployment runs it on a cron schedule).

It retrains only when something changed, and says what it decided and why (the flow run's log,
and the MLflow run's tags `retrain.decision`, `retrain.reason`, `retrain.based_on`):

    nothing changed (same data version, same configuration)   -> skipped, no training (`force` trains anyway)
    the data changed (a new version of the same source)       -> warm start from the champion's weights
                                                                  (its EMA, a short warm-up: TrainConfig.init_from,
                                                                  then the recipe's schedule and steps);
                                                                  `init="scratch"` trains from nothing
    the configuration changed                                  -> from scratch
    the classes changed (a class-conditional model: a class    -> from scratch, `model.num_classes` from the
    sub-folder removed, added or renamed)                         data: labels are positions in the sorted
                                                                  class names, so after a change the
                                                                  champion's label k means another class

Classes are compared by name: the reference run's tag `dataset.class_names` (tasks.data), else the
manifest of its prepared data; a class-conditional reference whose names are known by neither
trains from scratch too. A retrain that was already tried (the same configuration on the same data
from the same reference, and it lost) is not trained again unless `force`d.

The reference it compares with is the champion of the registered model `promote_to` (its source
run), else the best FINISHED run of the experiment (`best_run_config`), else the pipeline's
defaults. The data is re-prepared first (free when nothing changed: the preparation task is
cached on the config and the source's identity). After training, the run competes for the
champion alias (tasks.registry.promote_best: a head-to-head on the new data, beyond FID's noise).

    python -m flows.retrain
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import flow

from ddpm.data import DataConfig, DataError, read_manifest
from ddpm.training import PLACEMENT_FIELDS, TrainConfig
from flows.train_pipeline import ExperimentName, run_pipeline, start_run
from tasks import contract, retention, settings, tracking
from tasks.config import DEFAULTS, PipelineConfig, overlay
from tasks.data import DATASET_CLASS_NAMES_TAG, class_names_tag, prepare_data, tagged_class_names
from tasks.registry import ChallengeRule, champion_bundle, comparable_runs, current_champion, promote_best

# TrainConfig fields that do not make two configurations different for retraining: where a run
# trains, and what a warm start began from.
NOT_THE_CONFIGURATION = (*PLACEMENT_FIELDS, "init_from")


def best_run_config(experiment: str, metric: str | None = None) -> tuple[str, str, PipelineConfig] | None:
    """(run id, metric, configuration) of the best FINISHED train_pipeline run of `experiment`.

    Ranked by `metric` (default: the newest run's primary metric) in its direction among runs
    measured with one protocol (tasks.registry.comparable_runs: same metric, data, sample count,
    kind of model and sampler). None when the experiment
    has no such run. Runs without a config.json (comparison parents, older runs) are skipped.
    """
    try:
        runs, protocol = comparable_runs([experiment], metric)
    except LookupError:
        return None
    for run in runs:   # best first, by the metric's direction
        try:
            stored = tracking.run_config(run)
        except FileNotFoundError:  # not a pipeline run
            continue
        return run.info.run_id, protocol.metric, PipelineConfig.from_stored(stored)
    return None


def reference_run(experiment: str, model_name: str | None, metric: str | None):
    """(run, its configuration, champion version or None) that a retrain compares itself with: the
    champion's source run, else the best run of the experiment; None when there is neither."""
    champion = current_champion(model_name) if model_name else None
    if champion is not None and champion.run_id:
        try:
            run = tracking.find_run(champion.run_id)
            return run, PipelineConfig.from_stored(tracking.run_config(run)), champion
        except (LookupError, FileNotFoundError):   # its run was deleted, or not made by the pipeline
            pass
    best = best_run_config(experiment, metric)
    if best is None:
        return None
    run_id, _, config = best
    return tracking.find_run(run_id), config, None


def without_placement(config: PipelineConfig) -> dict:
    """The configuration as retraining compares it (NOT_THE_CONFIGURATION left out)."""
    stored = config.to_stored()
    stored["train"] = {k: v for k, v in stored["train"].items() if k not in NOT_THE_CONFIGURATION}
    return stored


def previous_attempt(experiment: str, reference, config: PipelineConfig, fingerprint: str) -> str | None:
    """A FINISHED retrain of this same configuration on this data from this same reference (a
    challenger that did not win: training it again, deterministically, would make the same model)."""
    if reference is None:
        return None
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=(
        f"attributes.status = 'FINISHED' and tags.`{contract.RETRAIN_BASED_ON_TAG}` = '{reference[0].info.run_id}' "
        f"and tags.`{contract.DATASET_FINGERPRINT_TAG}` = '{fingerprint}'"))
    wanted = without_placement(config)
    for run in runs:
        try:
            if without_placement(PipelineConfig.from_stored(tracking.run_config(run))) == wanted:
                return run.info.run_id
        except (FileNotFoundError, ValueError):
            continue
    return None


def reference_class_names(run) -> list[str] | dict | None:
    """The class names of the data `run` trained on (labels are positions in them): its tag
    `dataset.class_names` (tasks.data.tagged_class_names), else the manifest of its prepared data (runs
    logged before the tag); LookupError naming what is missing when neither is there."""
    try:
        return tagged_class_names(run.data.tags)
    except LookupError:
        pass
    path = run.data.tags.get(contract.DATASET_PATH_TAG)
    if path:
        try:
            return read_manifest(Path(path)).get("class_names")
        except DataError:
            pass
    raise LookupError(f"run {run.info.run_id} records no class names (no tag {DATASET_CLASS_NAMES_TAG}, and its "
                      f"prepared data {path or '(untagged)'} is gone)")


def _some(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def class_difference(old: list[str] | dict | None, new: list[str] | None) -> str | None:
    """How the data's class names `new` differ from `old` (reference_class_names), in words; None
    when they are the same."""
    if isinstance(old, dict):   # a long list, recorded by its count and hash
        if json.loads(class_names_tag(new)) == old:
            return None
        return f"the names of its {old['count']} classes are not the data's {len(new or [])}"
    if old == new:
        return None
    if old is None:
        return f"it had no labels, the data has {len(new)} classes"
    if new is None:
        return f"it had {len(old)} classes, the data has no labels"
    removed = [name for name in old if name not in set(new)]
    added = [name for name in new if name not in set(old)]
    moved = sum(1 for i, name in enumerate(old) if name in set(new) and new.index(name) != i)
    parts = [f"removed {_some(removed)}"] if removed else []
    parts += [f"added {_some(added)}"] if added else []
    parts += [f"{moved} other class(es) at another label"] if moved else []
    return "; ".join(parts) or "the same names in another order"


def with_data_classes(config: PipelineConfig, class_names: list[str] | None) -> PipelineConfig:
    """`config` with a class-conditional model's `num_classes` set to the data's class count (the
    rule of `ddpm train --conditional`); unchanged for an unconditional model or unlabelled data."""
    if config.model.num_classes is None or not class_names or len(class_names) == config.model.num_classes:
        return config
    # a class added or removed makes a new model, trained from scratch (retrain_decision), rather
    # than a DataError asking for num_classes=11 every night
    model = type(config.model).model_validate({**config.model.model_dump(), "num_classes": len(class_names)})
    return config.model_copy(update={"model": model})


def retrain_decision(reference, config: PipelineConfig, fingerprint: str, init: str, force: bool,
                     tried: str | None = None, class_names: list[str] | None = None) -> tuple[str, str]:
    """("skipped" | "warm-start" | "scratch", why) for training `config` on data `fingerprint`, whose
    classes are `class_names` (None: no labels); `tried`: a run that already trained it from this
    reference (previous_attempt)."""
    if reference is None:
        return "scratch", "no finished run to compare with: a first training"
    run, stored, champion = reference
    what = f"champion version {champion.version} (run {run.info.run_id})" if champion else f"best run {run.info.run_id}"
    same_data = run.data.tags.get(contract.DATASET_FINGERPRINT_TAG) == fingerprint
    changes = [key for key, value in tracking.flatten_params(without_placement(config)).items()
               if tracking.flatten_params(without_placement(stored)).get(key) != value]
    try:
        classes, unknown = class_difference(reference_class_names(run), class_names), None
    except LookupError as error:
        classes, unknown = None, str(error)
    # a class-conditional model's label k is the k-th class name: once the names change, warm-starting
    # would teach the champion's class k other images (remove `3/` and `4/` becomes class 3)
    conditional = stored.model.num_classes is not None
    already = (f"already tried: run {tried} trained this configuration on this data version ({fingerprint[:12]}) "
               f"from {what}, which stayed champion")
    if tried and not force and (changes or (conditional and (classes or unknown))):   # it would make the same model
        return "skipped", already
    if conditional and classes:
        return "scratch", (f"the classes changed against {what} ({classes}): a class-conditional model's labels "
                           "would mean other classes, so it trains from scratch, with the data's classes")
    if conditional and unknown:
        return "scratch", (f"cannot tell whether the classes changed against {what} ({unknown}): a class-conditional "
                           "model whose labels may mean other classes trains from scratch")
    if changes:
        return "scratch", f"the configuration changed against {what}: {', '.join(changes[:8])}"
    if same_data and not force:
        return "skipped", f"nothing changed since {what}: same data version ({fingerprint[:12]}), same configuration"
    if tried and not force:
        return "skipped", already
    why = "forced, nothing changed" if same_data else \
        f"the data changed ({run.data.tags.get(contract.DATASET_FINGERPRINT_TAG, '?')[:12]} -> {fingerprint[:12]})"
    if classes:   # said, though an unconditional model does not use labels
        why += f" and so did its classes ({classes}), which an unconditional model does not use"
    if init == "scratch":
        return "scratch", f"{why}; init='scratch'"
    if champion is None:
        return "scratch", f"{why}; no champion to start from"
    return "warm-start", f"{why}: starting from {what}'s weights"


@flow(name="retrain", log_prints=True)
def retrain(
    experiment: ExperimentName = contract.DEFAULT_EXPERIMENT,
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    metric: str | None = None,
    promote_to: str | None = contract.DEFAULT_MODEL_NAME,
    init: Literal["champion", "scratch"] = "champion",
    force: bool = False,
    challenge: ChallengeRule = ChallengeRule(),
) -> dict:
    """Retrain when the data or the configuration changed since the champion (see the module doc).

    The configuration is the champion's run's (else the best run's, else the defaults), with
    `data` / `train` changing the fields they name (e.g. `train={"steps": 3000}`; tasks.config's
    one rule for a partial section); where it trains (device, processes) is this deployment's.
    `init`: what a retrain on changed data starts from; `force`: train even when nothing changed
    (or when this very retrain was already tried and lost); `challenge`: how the new run must beat
    the champion to take the alias (tasks.registry.ChallengeRule).
    Returns {"decision", "reason", "run_id", "based_on", "promotion", ...the pipeline's summary}.
    """
    reference = reference_run(experiment, promote_to, metric)
    config = reference[1] if reference else DEFAULTS
    # where the reference trained (8 GPUs, two nodes) is not where this one runs: placement is this
    # deployment's (the defaults, then `train`); everything that shapes the model is the reference's
    placement = {name: getattr(DEFAULTS.train, name) for name in PLACEMENT_FIELDS}
    base_train = TrainConfig(**{**config.train.model_dump(), **placement, "init_from": None})
    config = config.model_copy(update={"data": overlay(config.data, data), "train": overlay(base_train, train)})

    home = settings.ddpm_home()
    disk_before = retention.usage(home)   # the night's disk: what it used, what retention freed (tasks.retention)
    dataset_path = prepare_data.with_options(result_storage=home / "task-results")(config.data,
                                                                                 out_dir=str(home / "data"))
    manifest = read_manifest(Path(dataset_path))
    fingerprint, class_names = manifest["fingerprint"], manifest["class_names"]
    config = with_data_classes(config, class_names)
    tried = previous_attempt(experiment, reference, config, fingerprint)
    decision, reason = retrain_decision(reference, config, fingerprint, init, force, tried, class_names)
    based_on = reference[0].info.run_id if reference else "defaults"
    print(f"retrain: {decision}: {reason}")
    tags = {contract.RETRAIN_BASED_ON_TAG: based_on, contract.RETRAIN_DECISION_TAG: decision,
            contract.RETRAIN_REASON_TAG: reason}
    if decision == "skipped":   # recorded where people look, with nothing trained
        run_id = start_run(experiment, "retrain-skipped", {}, tags=tags)
        tracking.client().set_terminated(run_id)
        return {"decision": decision, "reason": reason, "run_id": run_id, "based_on": based_on, "promotion": None,
                "disk": retention.after_night(home, disk_before, run_id)}
    if decision == "warm-start":
        champion = reference[2]
        try:
            weights = champion_bundle(promote_to, champion.version)
        except LookupError as error:   # its files gone from the store, or damaged there: a night still trains
            weights = None
            decision, reason = "scratch", f"{reason}; but the champion's weights cannot be read ({error}): from scratch"
            print(f"retrain: {decision}: {reason}")
            tags.update({contract.RETRAIN_DECISION_TAG: decision, contract.RETRAIN_REASON_TAG: reason})
        if weights is not None:
            config = config.model_copy(update={"train": config.train.model_copy(update={"init_from": str(weights)})})
            tags[contract.RETRAIN_CHAMPION_TAG] = str(champion.version)
    summary = run_pipeline(config, experiment=experiment, run_name=None, tags=tags)
    promotion = promote_best([experiment], promote_to, metric=metric, rule=challenge) if promote_to else None
    return {**summary, "decision": decision, "reason": reason, "based_on": based_on, "promotion": promotion,
            "disk": retention.after_night(home, disk_before, summary.get("run_id"))}


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        retrain()

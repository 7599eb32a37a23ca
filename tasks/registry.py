"""Promotion: register the best run by FID and move the `champion` alias only when it wins, beyond noise.

    comparable_runs     finished runs ranked by FID, only those measured alike (metric, data, samples, kind)
    promote_best        register the best one (its logged model) and decide whether it becomes champion
    head_to_head        both models re-scored with the challenger's protocol, on the same sampling seeds
    noise_aware_decision  whether the challenger wins by more than the measured spread allows by chance

The champion decision is a head-to-head: the challenger (the best comparable run) and the current
champion are each sampled with the challenger's sampler, steps, guidance and sample count on the
same `seeds` sampling seeds, and scored with the challenger's features against the challenger's
reference (its data version's holdout). A champion trained on an older version of the data is so
measured on the new reference, fairly. The alias moves only when the challenger's mean FID is
lower by more than a one-sided paired t-test at `confidence` allows by chance (and by at least
`min_margin`): a win inside FID's noise keeps the champion. Both means, their spreads, the
margin and the decision are tags of the challenger's version and run. Runs without a stored
configuration or data (made by hand, or by a version before this one) cannot be re-scored: they
are compared by their logged FIDs, measured alike or not at all, as before.

The served model itself (the pyfunc, its signature, logging it) is tasks.serving.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import statistics
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddpm.checkpoint import CheckpointError, checkpoint_step, list_checkpoints, verify_checkpoint
from ddpm.data import DataError
from tasks import contract, run_files, settings, tracking
from tasks.config import one_line
# Models registered before tasks.serving existed pickled a reference to tasks.registry.DDPMImageModel.
from tasks.serving import DDPMImageModel, log_ddpm_model  # noqa: F401

CHAMPION, DEFAULT_MODEL_NAME = contract.CHAMPION_ALIAS, contract.DEFAULT_MODEL_NAME


# --- promotion ------------------------------------------------------------------------------


def runs_with_fid(experiments: list[str], page_size: int = 5000) -> list:
    """FINISHED runs of `experiments` that carry an FID (tag `fid.metric` and that metric), newest first:
    all of them, read `page_size` at a time (MLflow's page_token), never a silent cap."""
    mlflow_client = tracking.client()
    ids = [e.experiment_id for name in experiments if (e := mlflow_client.get_experiment_by_name(name))]
    if not ids:
        return []
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=page_size,
                                         order_by=["attributes.end_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [r for r in runs if r.data.tags.get(contract.FID_METRIC_TAG) in r.data.metrics]


def is_conditional(run) -> str:
    """"true" for a class-conditional model's run, else "false" (runs from before the tag included)."""
    return run.data.tags.get(contract.CONDITIONAL_TAG, contract.TAG_DEFAULTS[contract.CONDITIONAL_TAG])


def comparable_runs(experiments: list[str] | str, metric: str | None = None, fingerprint: str | None = None,
                    num_samples: int | str | None = None,
                    conditional: bool | None = None) -> tuple[list, contract.Protocol]:
    """The FINISHED runs of `experiments` whose scores can be ranked against each other, best first
    by the metric's direction (ddpm.metrics.measures: FID and KID lower, precision and recall
    higher), each by the score of the model it ships (`shipped_score`), and the protocol they
    share (contract.Protocol): one metric (measure and features), one dataset fingerprint, one
    sample count, one kind of model (class-conditional or not: guided class-balanced samples and
    unconditional ones are different products), one sampler. Scores depend on all of these, so
    runs that differ in any are never compared. Each defaults to that of the newest run with an
    FID (with `metric`, when given: `kid_inception` ranks by KID). LookupError when none qualifies.
    """
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    if metric is not None:
        from ddpm.metrics.measures import parse_metric

        parse_metric(metric)   # ValueError naming the metrics there are
    runs = runs_with_fid(experiments)
    if not runs:
        raise LookupError(f"no finished run with an FID in experiment(s) {experiments}; train one first")
    metric = metric or runs[0].data.tags[contract.FID_METRIC_TAG]
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        raise LookupError(f"no finished run in {experiments} has the metric {metric}")
    fingerprint = fingerprint or runs[0].data.tags.get(contract.DATASET_FINGERPRINT_TAG)
    # the other criteria: those of the newest run on that data (its sample count, kind, sampler)
    newest = next((r for r in runs if r.data.tags.get(contract.DATASET_FINGERPRINT_TAG) == fingerprint), runs[0])
    protocol = contract.Protocol.of_run(newest, metric=metric, fingerprint=fingerprint,
                                        num_samples=None if num_samples is None else str(num_samples),
                                        conditional=None if conditional is None else str(bool(conditional)).lower())
    same = [r for r in runs if protocol.difference(contract.Protocol.of_run(r, metric=metric)) is None]
    if not same:
        raise LookupError(f"no finished run in {experiments} has {protocol.describe()}")
    return protocol.rank(same, lambda r: shipped_score(r, metric)), protocol


def shipped_score(run, metric: str) -> float:
    """The run's `metric` for the model it ships: the post-hoc EMA reconstruction evaluate chose
    (its `posthoc_ema.<metric>_best`, measured with the run's own protocol), else the run's own
    EMA's (`<metric>`)."""
    if run.data.tags.get(contract.POSTHOC_CHOSEN_TAG) == "reconstruction":
        chosen = run.data.metrics.get(contract.POSTHOC_METRIC_PREFIX + metric + contract.BEST_SUFFIX)
        if chosen is not None:
            return float(chosen)
    return float(run.data.metrics[metric])


def posthoc_choice(run) -> tuple[int, Path | None, dict] | None:
    """(step, checkpoint if it is on this host, logged-model tags) of the post-hoc EMA
    reconstruction that evaluate chose for the run (tasks.posthoc), when it chose one; else None.
    The reconstruction was logged as a model of the run, so another host registers that model."""
    tags = run.data.tags
    if tags.get(contract.POSTHOC_CHOSEN_TAG) != "reconstruction":
        return None
    path = Path(tags.get(contract.POSTHOC_CHECKPOINT_TAG, ""))
    step = int(tags[contract.POSTHOC_STEP_TAG]) if tags.get(contract.POSTHOC_STEP_TAG) else checkpoint_step(path)
    return step, (path if path.is_file() else None), {contract.POSTHOC_SIGMA_REL_TAG: tags[contract.POSTHOC_SIGMA_REL_TAG]}


def step_of_fid(run, metric: str) -> int | None:
    """The training step whose samples gave the run's `metric` (its newest value), None without one."""
    history = tracking.client().get_metric_history(run.info.run_id, metric)
    return max(history, key=lambda m: m.timestamp).step if history else None


def checkpoint_for_fid(run, metric: str) -> Path | None:
    """The checkpoint whose samples gave the run's `metric` (the step of it), else the newest one;
    on this host or fetched from the run's artifact store (tasks.run_files); None when neither has one."""
    step = step_of_fid(run, metric)
    return (run_files.checkpoint(run, step) if step is not None else None) or run_files.checkpoint(run)


def register_logged_model(run, step: int, model_name: str, max_images: int, tags: dict | None = None):
    """Register the model the training run logged of its checkpoint at `step` (same request bound,
    the same post-hoc EMA tags: none for the run's own EMA) instead of logging it again; None when
    the run has no such model."""
    mlflow_client = tracking.client()
    step = str(step)
    models = mlflow_client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`{contract.LOGGED_STEP_TAG}` = '{step}' "
                      f"AND tags.`{contract.LOGGED_MAX_IMAGES_TAG}` = '{max_images}'")
    wanted = (tags or {}).get(contract.POSTHOC_SIGMA_REL_TAG)
    ready = [m for m in models if m.status == LoggedModelStatus.READY
             and m.tags.get(contract.POSTHOC_SIGMA_REL_TAG) == wanted]
    if not ready:
        return None
    return mlflow.register_model(f"models:/{ready[0].model_id}", model_name)


def registered_version(model_name: str, run_id: str, model_tags: dict | None = None):
    """The version of `model_name` already registered from run `run_id` (of the same post-hoc EMA
    width as `model_tags` says; none: the run's own EMA), or None."""
    wanted = (model_tags or {}).get(contract.POSTHOC_SIGMA_REL_TAG)
    versions = [v for v in tracking.client().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
                if v.tags.get(contract.POSTHOC_SIGMA_REL_TAG) == wanted]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def current_champion(model_name: str):
    try:
        return tracking.client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:  # no registered model, or no alias yet
        return None


def champion_decision(candidate_tags: dict, champion_tags: dict | None) -> tuple[bool, str]:
    """The decision by logged scores, for runs that cannot be re-scored (`challenge` uses it when the
    challenger or the champion has no stored configuration or data here).

    Only scores measured with the same protocol (contract.Protocol: metric, data, sample count,
    kind of model, sampler) are comparable; a champion measured otherwise is kept. The better
    score by the metric's direction wins; no spread is known, so this is the strict rule.
    """
    if champion_tags is None:
        return True, "no champion yet"
    protocol = contract.Protocol.from_tags(candidate_tags)
    difference = protocol.difference(contract.Protocol.from_tags(champion_tags))
    if difference is not None:
        return False, f"champion was measured with {difference}; scores are not comparable, champion kept"
    metric = protocol.metric
    new, old = float(candidate_tags[contract.VERSION_FID_TAG]), float(champion_tags[contract.VERSION_FID_TAG])
    if math.isnan(old) or protocol.better(new, old):
        return True, f"{metric} {new:.4g} beats the champion's {old:.4g}"
    word = "ties" if new == old else "is worse than"
    return False, f"{metric} {new:.4g} {word} the champion's {old:.4g}; champion kept"


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


# --- the head-to-head -------------------------------------------------------------------------


class ChallengeRule(BaseModel):
    """How a challenger must beat the champion: on `seeds` paired sampling seeds, by more than a
    one-sided paired t-test at `confidence` allows by chance, and by at least `min_margin`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seeds: int = Field(3, ge=1, le=20, description="sampling seeds both models are scored on, pairwise")
    confidence: float = Field(0.95, ge=0.5, lt=1, allow_inf_nan=False,
                              description="of the paired t-test the challenger must pass: two models of equal "
                                          "quality swap the alias with probability 1 - confidence")
    min_margin: float = Field(0.0, ge=0, allow_inf_nan=False,
                              description="... and by at least this much of the metric (needed with one seed)")

    @model_validator(mode="after")
    def _a_spread_or_a_margin(self):
        # one seed measures no spread: the t-test's margin would be 0 and any difference, noise
        # included, would move the alias
        if self.seeds < 2 and self.min_margin == 0:
            raise ValueError(f"{self.seeds} seed measures no noise, so any difference would move the champion: "
                             "use seeds >= 2 (default 3), or give min_margin, the difference that counts")
        return self


# The head-to-head's sampling seeds: seed + stride, seed + 2 stride, ... (image i of one is never image
# j of another), never `seed` itself, on which the challenger's logged FID picked it among the
# candidates: that FID is biased low by the selection.
SEED_STRIDE = 1_000_003


def champion_bundle(model_name: str, version: str | int) -> Path:
    """The EMA checkpoint a registered version serves (its bundle's step-*.pt), downloaded once to
    $DDPM_HOME/registry/<name>/<version>-<key> and verified by its checksum each time: a damaged
    cached copy is dropped and fetched again, once; LookupError in one line naming the version when
    its files are gone from the store or damaged there."""
    try:
        source = tracking.client().get_model_version(model_name, str(version)).source
    except MlflowException as error:
        raise LookupError(f"no {model_name} version {version} in {settings.redact(settings.tracking_uri())}: "
                          f"{one_line(error)}") from None
    # keyed by the store and the version's source: another store's "ddpm/1" is another model
    key = hashlib.sha256(f"{settings.tracking_uri()}\n{source}".encode()).hexdigest()[:12]
    folder = settings.ddpm_home(create=True) / "registry" / model_name / f"{version}-{key}"
    problem = ""
    for attempt in range(2):   # a cached copy that fails its checksum is dropped and fetched once more
        found = list_checkpoints(folder / "artifacts" / "checkpoint")
        if not found:
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(folder))
            except (MlflowException, OSError) as error:
                raise LookupError(f"the files of {model_name} version {version} cannot be read from the store "
                                  f"(deleted, or the store unreachable: {one_line(error)})") from None
            found = list_checkpoints(folder / "artifacts" / "checkpoint")
        if len(found) != 1:
            raise LookupError(f"{model_name} version {version} holds {len(found)} checkpoints in its bundle, expected "
                              "one: its files are gone from the store or damaged")
        try:
            verify_checkpoint(found[0])
            return found[0]
        except CheckpointError as error:
            problem = one_line(error)
            shutil.rmtree(folder, ignore_errors=True)
    raise LookupError(f"{model_name} version {version}'s checkpoint fails its checksum even fetched afresh: {problem}")


def rescorable(run) -> bool:
    """A run whose protocol can be replayed: its stored configuration, and its prepared data on
    this host or in the store (tasks.run_files.run_dataset)."""
    try:
        config = tracking.run_config(run)
        run_files.run_dataset(run, _stored_data(config))
    except (FileNotFoundError, ValueError, DataError):
        return False
    return True


def _stored_data(config: dict):
    from tasks.config import PipelineConfig

    return PipelineConfig.from_stored(config).data


def head_to_head(challenger_run, metric: str, model_name: str, versions: dict[str, str], seeds: int) -> dict:
    """{name: [`metric` per seed]} of the registered `versions` ({"challenger": "3", "champion": "1"}),
    each sampled with the challenger run's sampling settings on the same `seeds` seeds and scored
    by `metric` (its measure and features) against the challenger's reference (its data's holdout)."""
    from ddpm.data import load_prepared
    from ddpm.metrics.scoring import Scorer
    from ddpm.sampling import draw_images, load_sampler
    from ddpm.training import resolve_device
    from tasks.config import PipelineConfig

    config = PipelineConfig.from_stored(tracking.run_config(challenger_run))
    sampling = config.sampling
    dataset = load_prepared(Path(run_files.run_dataset(challenger_run, config.data)))
    scorer = Scorer.for_metric(dataset, metric, settings.metrics_cache_dir())
    device = resolve_device("auto")
    fids: dict[str, list[float]] = {}
    for name, version in versions.items():
        model, sampler, _ = load_sampler(champion_bundle(model_name, version), sampling, use_ema=False, device=device)
        shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
        if shape != tuple(dataset.images.shape[1:]):
            raise ValueError(f"{model_name} version {version} draws {shape} images, the reference holds "
                             f"{tuple(dataset.images.shape[1:])}: not comparable")
        fids[name] = [scorer.value(draw_images(model, sampler, sampling.model_copy(
            update={"seed": sampling.seed + (k + 1) * SEED_STRIDE}), device)[0], metric) for k in range(seeds)]
    return {**fids, "protocol": f"{metric}, {sampling.num_images} samples, {sampling.describe()}, {seeds} seeds, "
                                f"reference {dataset.fingerprint[:12]}"}


def noise_aware_decision(challenger: list[float], champion: list[float], confidence: float = 0.95,
                         min_margin: float = 0.0, lower_is_better: bool = True) -> tuple[bool, str, dict]:
    """(moved, why, the numbers) for scores measured on the same seeds, pairwise.

    d_k = challenger_k - champion_k, read in the metric's direction (`lower_is_better`; for a
    higher-is-better metric the sign is turned). The challenger wins when it is better by more
    than margin = max(min_margin, t * sd(d) / sqrt(K)), t Student's quantile at `confidence` for
    K - 1 degrees of freedom: a one-sided paired t-test, so two models of equal quality swap the
    alias with probability 1 - confidence (5% by default), whatever K. One seed measures no
    spread: the margin is min_margin alone (ChallengeRule requires one then), and the reason says
    so rather than calling it a noise margin. (The numbers' keys keep their names, challenger_fid
    etc., whatever the metric: the version's and run's tags are read by those names.)"""
    from scipy.stats import t as student_t

    sign = 1 if lower_is_better else -1
    differences = [a - b for a, b in zip(challenger, champion)]
    k = len(differences)
    mean_difference = statistics.fmean(differences)
    spread = statistics.stdev(differences) if k > 1 else float("nan")
    noise = float(student_t.ppf(confidence, k - 1)) * spread / math.sqrt(k) if k > 1 else float("nan")
    margin = max(min_margin, noise) if k > 1 else min_margin
    if k < 2:
        what, which = f"the minimum margin {margin:.3g} (one seed: no noise measured)", "minimum margin"
    elif margin > noise:
        what, which = f"the minimum margin {margin:.3g} (the noise margin is {noise:.3g})", "minimum margin"
    else:
        what, which = f"the noise margin {margin:.3g}", "noise margin"
    numbers = {"challenger_fid": statistics.fmean(challenger), "champion_fid": statistics.fmean(champion),
               "challenger_fid_std": statistics.stdev(challenger) if k > 1 else float("nan"),
               "champion_fid_std": statistics.stdev(champion) if k > 1 else float("nan"),
               "difference": mean_difference, "difference_std": spread, "margin": margin, "seeds": k}
    said = (f"{numbers['challenger_fid']:.4g} ± {numbers['challenger_fid_std']:.2g} against the champion's "
            f"{numbers['champion_fid']:.4g} ± {numbers['champion_fid_std']:.2g} on the same {k} seed(s)")
    gain = -sign * mean_difference   # > 0: the challenger is better
    if gain > margin:
        return True, f"{said}: better by {gain:.3g}, beyond {what}", numbers
    verdict = "worse" if -gain > margin else f"a tie within the {which}"
    return False, f"{said}: {verdict} ({mean_difference:+.3g}, {which} {margin:.3g}); champion kept", numbers


def promote_best(experiments: list[str] | str = contract.DEFAULT_EXPERIMENT, model_name: str = DEFAULT_MODEL_NAME,
                 fingerprint: str | None = None, metric: str | None = None, max_images: int = 64,
                 log=print, conditional: bool | None = None, rule: ChallengeRule = ChallengeRule()) -> dict:
    """Register the best run by FID as a version of `model_name`; move `champion` to it if it wins.

    Candidates: comparable_runs(experiments, metric, fingerprint, conditional=conditional):
    FINISHED runs with `metric` on data `fingerprint` at one sample count, of one kind of model
    (class-conditional or not), each by default that of the newest run with an FID. The best
    candidate is registered once (a run already registered reuses its version), its version
    tagged with fid, fid.metric, fid.num_samples, fid.sampler, schedule, dataset.fingerprint and
    source_run_id; then it meets the champion head-to-head (`challenge`, by `rule`). The decision and
    its reason go in the version's tags `promotion.decision`/`promotion.reason`.
    """
    # One promotion at a time per store on this machine: two at once registered one run twice.
    with tracking.store_lock("promote"):
        return _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional, rule)


def _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional, rule) -> dict:
    candidates, protocol = comparable_runs(experiments, metric, fingerprint, conditional=conditional)
    metric, fingerprint = protocol.metric, protocol.fingerprint

    def fid_of(run) -> float:   # the score of what the version holds: a reconstruction's own, when chosen
        return shipped_score(run, metric)

    mlflow_client = tracking.client()
    skipped = []
    for run in candidates:  # the best one we can still register
        # evaluate --posthoc-ema's choice when it made one, else the checkpoint of the run's FID
        step, checkpoint, model_tags = posthoc_choice(run) or (step_of_fid(run, metric), None, {})
        version = registered_version(model_name, run.info.run_id, model_tags)
        if version is not None:
            break
        # the model the run logged of that checkpoint (in the store: any host registers it) ...
        version = register_logged_model(run, step, model_name, max_images, model_tags) if step is not None else None
        if version is not None:
            break
        # ... else the checkpoint itself, here or fetched from the run's artifact store, logged now
        checkpoint = checkpoint or checkpoint_for_fid(run, metric)
        if checkpoint is not None:
            step = checkpoint_step(checkpoint)
        if checkpoint is None:
            skipped.append(run.info.run_id)
            log(f"run {run.info.run_id} ({metric} {fid_of(run):.4g}) has no logged model or checkpoint under "
                f"{', '.join(map(str, run_files.checkpoint_folders(run)))} or in its artifact store; trying the next best")
            continue
        info = log_ddpm_model(run.info.run_id, checkpoint, model_name, max_images=max_images, tags=model_tags)
        version = mlflow_client.get_model_version(model_name, str(info.registered_model_version))
        break
    else:
        raise LookupError(f"none of the {len(candidates)} candidate runs has a logged model or a checkpoint, on this "
                          "machine or in the artifact store")

    # the version says what it holds: its score, the step and (a post-hoc reconstruction) the width
    tags = {contract.VERSION_FID_TAG: repr(fid_of(run)), **protocol.tags(),
            contract.SCHEDULE_TAG: run.data.tags.get(contract.SCHEDULE_TAG, ""),
            contract.SOURCE_RUN_TAG: run.info.run_id}
    if step is not None:
        tags[contract.LOGGED_STEP_TAG] = str(step)
    tags |= model_tags   # a post-hoc EMA reconstruction: its width
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version.version, key, value)

    champion = current_champion(model_name)
    numbers = None
    if champion is not None and champion.version == version.version:
        moved, reason = False, "already the champion"
    else:
        moved, reason, numbers = challenge(run, version, champion, tags, model_name, metric, rule, log)
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
            "fid": fid_of(run), "metric": metric, "num_samples": protocol.num_samples, "step": step,
            "fingerprint": fingerprint, "conditional": protocol.conditional == "true", "moved": moved,
            "reason": reason, "champion_version": str(champion_version) if champion_version else None,
            "skipped_runs": skipped, "head_to_head": numbers}


def challenge(run, version, champion, tags: dict, model_name: str, metric: str, rule, log):
    """(moved, reason, head-to-head numbers or None) of the challenger `version` (of `run`)
    against `champion` (a version, or None). The numbers are logged on both."""
    if champion is None:
        return True, "no champion yet", None
    held = champion_tags(champion)
    kind = held.get(contract.CONDITIONAL_TAG, contract.TAG_DEFAULTS[contract.CONDITIONAL_TAG])
    if kind != tags[contract.CONDITIONAL_TAG]:
        return False, (f"the champion is another kind of model ({contract.CONDITIONAL_TAG} {kind!r} vs "
                       f"{tags[contract.CONDITIONAL_TAG]!r}): promote each kind into its own registered model; "
                       "champion kept"), None
    if not rescorable(run):   # no stored protocol or data to replay (made by hand, or elsewhere)
        moved, reason = champion_decision(tags, held)   # their logged FIDs, measured alike or not at all
        return moved, reason, None
    log(f"head-to-head: {model_name} version {version.version} against the champion, version {champion.version}, "
        f"on {rule.seeds} sampling seeds")
    try:
        fids = head_to_head(run, metric, model_name, {"challenger": version.version, "champion": champion.version},
                            rule.seeds)
    except (ValueError, LookupError, CheckpointError) as error:   # another shape; the champion's files gone
        log(f"no head-to-head: {one_line(error)}; champion kept")
        return False, f"no head-to-head ({one_line(error)}); champion kept", None
    moved, reason, numbers = noise_aware_decision(fids["challenger"], fids["champion"], rule.confidence,
                                                  rule.min_margin, contract.Protocol.from_tags(tags).measure.lower_is_better)
    numbers = {**numbers, "protocol": fids["protocol"], "challenger_fids": fids["challenger"],
               "champion_fids": fids["champion"], "champion_version": str(champion.version)}
    mlflow_client = tracking.client()
    for key, value in numbers.items():
        text = ", ".join(f"{v:.4g}" for v in value) if isinstance(value, list) else \
            (f"{value:.6g}" if isinstance(value, float) else str(value))
        mlflow_client.set_model_version_tag(model_name, version.version, f"{contract.HEAD_TO_HEAD_PREFIX}{key}", text)
        mlflow_client.set_tag(run.info.run_id, f"{contract.HEAD_TO_HEAD_PREFIX}{key}", text)
    return moved, f"{metric} {reason}", numbers

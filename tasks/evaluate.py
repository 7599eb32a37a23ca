"""Evaluation tasks: score samples (ddpm.metrics.scoring) and log the numbers to MLflow.

Metric names carry the measure and the extractor (`fid_inception`, `kid_inception`,
`precision_classifier`), so numbers measured differently are never compared. With the default
extractor "auto" a run logs every measure (ddpm.metrics.measures.MEASURES: FID, KID with its
spread `kid_<x>_std`, precision and recall) with every extractor it can: Inception when the
`inception` extra is installed (the standard, comparable with papers), the classifier when the
data has labels; all from one feature pass per extractor. The ranking measure (FID unless asked
otherwise) of the first extractor is the run's primary metric (tag `fid.metric`): what
promotion, compare and retrain rank by, in its direction. The real-vs-real floor (as many real
train images as samples, against the same holdout reference) is logged beside every measure
biased at finite n (FID, precision, recall): what a perfect model scores with that many samples.
Classifier weights, reference features and floors are cached in $DDPM_HOME/cache/metrics.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prefect import task

from ddpm.data import load_prepared
from ddpm.metrics.measures import DEFAULT_MEASURE, measure_of
from ddpm.metrics.fid import plot_class_histogram
from ddpm.metrics.scoring import ExtractorKind, Scorer, check_evaluation, load_samples
from ddpm.progress import progress_bar
from ddpm.samplers import SamplerConfig
from ddpm.sampling import draw_images, load_sampler
from ddpm.training import is_repeating
from tasks import contract, plots, tracking
from tasks.settings import metrics_cache_dir as cache_dir


@task
def warm_scoring_cache(dataset_path: str, extractor: ExtractorKind, num_samples: int) -> None:
    """Build what scoring samples of this dataset needs (the classifier, the reference statistics,
    the FID floors at `num_samples`) into the on-disk cache, once: pipelines that then run side
    by side, in threads or other processes, load it instead of each building it."""
    dataset = load_prepared(Path(dataset_path))
    Scorer.build(dataset, check_evaluation(extractor, dataset, num_samples), cache_dir()).floors(num_samples)


def _retry_unless_repeating(task, task_run, state) -> bool:
    """A full disk (the metrics cache), a bad input or a missing extra fails the same way again:
    retry only other failures (a store that did not answer)."""
    try:
        state.result()
    except Exception as error:
        return not is_repeating(error)
    return False


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_unless_repeating)
def evaluate_samples(
    samples_npz: str,
    dataset_path: str,
    run_id: str | None = None,
    step: int = 0,
    extractor: ExtractorKind = "auto",
    model_id: str | None = None,
    sampler: str | None = None,
    metric_prefix: str = "",
    rank_by: str = DEFAULT_MEASURE,
) -> dict:
    """Every measure of the samples in `samples_npz` against the dataset's holdout split, plus floors.

    Logs each metric (`fid_<extractor>`, `kid_<extractor>` and `kid_<extractor>_std`,
    `precision_<extractor>`, `recall_<extractor>`) and the floors (`<metric>_floor`) at `step` to
    MLflow run `run_id` (linked to its logged model `model_id`, when given), and the run's
    measurement protocol (contract.Protocol, today's tags): `fid.metric` (the primary one, the
    measure `rank_by` of the first extractor), `fid.num_samples` and `fid.sampler` (`sampler`,
    SamplerConfig.describe(): what makes its scores comparable with other runs'). With `metric_prefix` (an evaluation by another
    protocol than the run's own) every metric name carries it and the run's tags stay as they
    were: its comparability is never rewritten by numbers measured differently. With the
    classifier, also its accuracy, the mean
    confidence on the samples and a class histogram. Samples of a class-conditional model (the
    npz holds their `labels`) add `conditional_accuracy` (the share the classifier assigns to
    the class asked for) and the per-class fid_classifier (`fid_classifier_class_mean`, each
    class in evaluation/per_class_fid-<step>.json).
    """
    dataset = load_prepared(Path(dataset_path))
    samples, class_labels = load_samples(samples_npz)
    names = check_evaluation(extractor, dataset, len(samples))
    scorer = Scorer.build(dataset, names, cache_dir(), conditional=class_labels is not None, rank_by=rank_by)
    # "metrics": the FIDs (each with its floor), "measures": every metric name, the primary first
    result = {"metric": scorer.primary, "metrics": scorer.fid_metrics, "measures": scorer.metrics,
              "num_samples": len(samples), "step": step, **scorer.score(samples, class_labels)}
    if run_id:
        metrics = {k: v for k, v in result.items() if isinstance(v, float)}
        mlflow_client = tracking.client()
        mlflow_client.log_batch(run_id, metrics=[
            tracking.Metric(metric_prefix + k, v, int(time.time() * 1000), step, model_id=model_id)
            for k, v in metrics.items()
        ])
        if not metric_prefix:   # the measurement's part of the protocol (data and kind are training's tags)
            protocol = contract.Protocol(result["metric"], num_samples=len(samples), sampler=sampler or None)
            for key, value in protocol.tags().items():
                if key in contract.MEASUREMENT_TAGS:
                    mlflow_client.set_tag(run_id, key, value)
        if "fid_classifier_per_class" in result:
            tracking.log_dict(run_id, result["fid_classifier_per_class"],
                              f"{contract.EVALUATION_FOLDER}/{metric_prefix}per_class_fid-{step:07d}.json")
        if "class_histogram" in result:
            with tempfile.TemporaryDirectory() as tmp:
                with plots.RENDER_LOCK:  # matplotlib text layout is not thread-safe
                    path = plot_class_histogram(result["class_histogram"], dataset.manifest.get("class_names"),
                                                Path(tmp) / f"{metric_prefix}class_histogram-{step:07d}.png")
                tracking.log_file(run_id, path, contract.EVALUATION_FOLDER)
    return result


# The guidance scales a class-conditional run is scored at (0 unconditional, 1 conditional; 1.5
# the default, ddpm.guidance.DEFAULT_GUIDANCE_SCALE).
GUIDANCE_SWEEP = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)


@task
def guidance_sweep(
    checkpoint: str,
    sampling: SamplerConfig,
    dataset_path: str,
    run_id: str | None = None,
    scales: tuple[float, ...] = GUIDANCE_SWEEP,
    extractor: ExtractorKind = "auto",
) -> dict:
    """Sample a class-conditional checkpoint at each guidance scale and score each set: FIDs and
    conditional accuracy against w. With `run_id`, logged as the table evaluation/guidance_sweep.json,
    the plot plots/guidance_sweep.png and the tag `guidance.best_scale` (the best primary metric,
    in its direction)."""
    dataset = load_prepared(Path(dataset_path))
    names = check_evaluation(extractor, dataset, sampling.num_images)
    scorer = Scorer.build(dataset, names, cache_dir(), conditional=True)
    metric = scorer.primary
    # the model is loaded once; the sampler does not depend on the guidance scale
    model, sampler, step = load_sampler(checkpoint, sampling)
    if model.config.num_classes is None:
        raise ValueError("the guidance sweep needs a class-conditional model; this checkpoint is unconditional")
    rows = []
    for scale in progress_bar(list(scales), desc="guidance sweep", unit="w"):
        images, class_labels = draw_images(model, sampler, SamplerConfig(**{**sampling.model_dump(),
                                                                           "guidance_scale": scale}), "cpu")
        scores = scorer.score(images, class_labels)
        rows.append({"guidance_scale": scale, **{name: scores[name] for name in scorer.metrics if name in scores},
                     "conditional_accuracy": scores.get("conditional_accuracy"),
                     "fid_classifier_class_mean": scores.get("fid_classifier_class_mean")})
    best = measure_of(metric).best(rows, lambda r: r[metric])
    if run_id:
        mlflow_client = tracking.client()
        mlflow_client.log_table(run_id, data={key: [r[key] for r in rows] for key in rows[0]},
                                artifact_file=contract.GUIDANCE_SWEEP_TABLE)
        plots.log_figure(run_id, lambda: plots.guidance_sweep_plot(rows, metric), contract.GUIDANCE_SWEEP_PLOT)
        mlflow_client.set_tag(run_id, contract.GUIDANCE_BEST_SCALE_TAG, f"{best['guidance_scale']:g}")
    return {"metric": metric, "rows": rows, "best_scale": best["guidance_scale"], "step": step}

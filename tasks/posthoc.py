"""Post-hoc EMA in the evaluation: reconstruct a sweep of EMA widths from a run's snapshots
(ddpm.posthoc_ema), score each with the run's FID protocol, and keep the best.

One task per (width, step), so a Dask task runner scores them in parallel; `log_posthoc_sweep`
then logs the width -> FID table and plot on the run and, when a reconstruction scored better
than the run's own EMA, logs it as a model of the run and tags the run with it
(contract.POSTHOC_*): promotion registers that one.

Every width is sampled with the same seed as the run's own EMA, so the sweep compares models, not
draws; a single FID at a few hundred samples still moves by a few points between seeds, so the
chosen width is a measurement, not a certainty: promotion's head-to-head then samples the chosen
model on fresh seeds against the champion.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from ddpm.data import load_prepared
from ddpm.metrics.measures import DEFAULT_MEASURE, measure_of
from ddpm.metrics.scoring import ExtractorKind, Scorer, check_evaluation
from ddpm.posthoc_ema import PosthocEMAError, fixed_ema_sigma_rel, posthoc_checkpoint
from ddpm.samplers import SamplerConfig
from ddpm.sampling import checkpoint_images
from tasks import contract, plots, tracking
from tasks.settings import metrics_cache_dir

# The widths evaluate sweeps by default: EDM2's range around its tracked 0.05 and 0.10, each
# used where the snapshots reconstruct it (ddpm.posthoc_ema.MAX_PROFILE_ERROR).
DEFAULT_SIGMA_RELS = (0.03, 0.05, 0.07, 0.10, 0.15, 0.22)


def reconstructions_dir(run_dir: Path | str, sigma_rel: float) -> Path:
    return Path(run_dir) / "posthoc-ema" / f"sigma_rel-{sigma_rel:.4f}"


@task(task_run_name="posthoc-ema-{sigma_rel}-step-{step}")
def score_posthoc_width(checkpoint_dir: str, sigma_rel: float, step: int | None, sampling: SamplerConfig,
                        dataset_path: str, extractor: ExtractorKind, out_dir: str,
                        rank_by: str = DEFAULT_MEASURE) -> dict:
    """Reconstruct the EMA of width `sigma_rel` at snapshot `step` (None: the last) as a checkpoint
    under `out_dir`, sample it with `sampling` and score it: {sigma_rel, step, checkpoint,
    profile_error, metric: the primary (measure `rank_by`), <metric>: value for every measure and
    extractor}; {..., "skipped": why} when the snapshots cannot reconstruct that width."""
    try:
        checkpoint, info = posthoc_checkpoint(checkpoint_dir, sigma_rel, reconstructions_dir(out_dir, sigma_rel), step)
    except PosthocEMAError as error:
        return {"sigma_rel": sigma_rel, "step": step, "skipped": str(error)}
    images, step, class_labels = checkpoint_images(checkpoint, sampling, device="auto")
    dataset = load_prepared(Path(dataset_path))
    scorer = Scorer.build(dataset, check_evaluation(extractor, dataset, len(images)), metrics_cache_dir(),
                          conditional=class_labels is not None, rank_by=rank_by)
    scores = scorer.score(images, class_labels)
    return {"sigma_rel": sigma_rel, "step": step, "checkpoint": str(checkpoint),
            "profile_error": info["profile_error"], "metric": scorer.primary,
            **{name: scores[name] for name in scorer.metrics if name in scores}}


@task
def log_posthoc_sweep(run_id: str, rows: list[dict], fixed: dict[int, float], ema_decay: float,
                      ema_warmup: bool = True) -> dict:
    """Log the sweep on MLflow run `run_id` and choose: the table evaluation/posthoc_ema.json, the
    plot plots/posthoc_ema.png, `posthoc_ema.<metric>_best` for every metric of the best width (the
    score of the model the run ships, when it is chosen: promotion ranks by it),
    `posthoc_ema.fixed_<metric>`. The best reconstruction (by the primary metric's direction) is
    compared with the run's own EMA at the same step (`fixed`: {step: its primary metric}, the
    run's checkpoints as evaluate scored them); when it is better it is logged as a model of the
    run (tagged with its width) and the run's posthoc_ema.* tags point at it. A best step with no
    checkpoint of the run's own EMA is refused (PosthocEMAError, one line): a reconstruction at
    step 50 against the EMA at step 60 compares two trainings' lengths, not two EMAs.
    Returns {"chosen": "reconstruction" | "fixed", "best": row, "rows": rows, "metric", "fixed"}."""
    scored = [r for r in rows if "skipped" not in r]
    if not scored:
        raise PosthocEMAError("no width of the sweep could be reconstructed: " + "; ".join(r["skipped"] for r in rows))
    metric = scored[0]["metric"]
    measure = measure_of(metric)
    best = measure.best(scored, lambda r: r[metric])
    if best["step"] not in fixed:
        raise PosthocEMAError(f"the best post-hoc EMA (sigma_rel {best['sigma_rel']:g}) is at step {best['step']}, where "
                              f"the run has no checkpoint of its own EMA to compare it with (checkpoints at steps "
                              f"{sorted(fixed)}): sweep a step that has both")
    fixed_score = fixed[best["step"]]
    fixed_width = fixed_ema_sigma_rel(ema_decay, best["step"], ema_warmup)
    mlflow_client = tracking.client()
    columns = ["sigma_rel", "step", metric, "profile_error"]
    columns += [name for name in best if name not in (*columns, "metric", "checkpoint") and isinstance(best[name], float)]
    # MLflow's table format, written whole: log_table would append to an earlier sweep's rows
    tracking.log_dict(run_id, {"columns": columns, "data": [[r.get(key) for key in columns] for r in scored]},
                      contract.POSTHOC_TABLE)
    label = f"the run's EMA at step {best['step']} (decay {ema_decay:g}, sigma_rel ~{fixed_width:.2f})"
    plots.log_figure(run_id, lambda: plots.posthoc_ema_plot(scored, metric, fixed_score, label), contract.POSTHOC_PLOT)
    now = int(time.time() * 1000)
    metrics = [tracking.Metric(contract.POSTHOC_METRIC_PREFIX + name + contract.BEST_SUFFIX, best[name], now,
                               best["step"]) for name in columns[4:] + [metric] if name in best]
    metrics.append(tracking.Metric(f"{contract.POSTHOC_METRIC_PREFIX}fixed_{metric}", fixed_score, now, best["step"]))
    mlflow_client.log_batch(run_id, metrics=metrics)
    chosen = "reconstruction" if measure.better(best[metric], fixed_score) else "fixed"
    tags = {contract.POSTHOC_CHOSEN_TAG: chosen}
    if chosen == "reconstruction":
        from tasks.serving import log_ddpm_model

        sigma = f"{best['sigma_rel']:g}"
        # the default request bound, as training logs its model: promotion finds either alike
        log_ddpm_model(run_id, best["checkpoint"], tags={contract.POSTHOC_SIGMA_REL_TAG: sigma})
        tags |= {contract.POSTHOC_SIGMA_REL_TAG: sigma, contract.POSTHOC_STEP_TAG: str(best["step"]),
                 contract.POSTHOC_CHECKPOINT_TAG: best["checkpoint"]}
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)
    return {"chosen": chosen, "best": best, "rows": rows, "metric": metric, "fixed": fixed_score,
            "fixed_step": best["step"]}

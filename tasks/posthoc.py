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
                        dataset_path: str, extractor: ExtractorKind, out_dir: str) -> dict:
    """Reconstruct the EMA of width `sigma_rel` at snapshot `step` (None: the last) as a checkpoint
    under `out_dir`, sample it with `sampling` and score it: {sigma_rel, step, checkpoint,
    profile_error, <metric>: FID for each extractor}; {..., "skipped": why} when the snapshots
    cannot reconstruct that width."""
    try:
        checkpoint, info = posthoc_checkpoint(checkpoint_dir, sigma_rel, reconstructions_dir(out_dir, sigma_rel), step)
    except PosthocEMAError as error:
        return {"sigma_rel": sigma_rel, "step": step, "skipped": str(error)}
    images, step, class_labels = checkpoint_images(checkpoint, sampling, device="auto")
    dataset = load_prepared(Path(dataset_path))
    scorer = Scorer.build(dataset, check_evaluation(extractor, dataset, len(images)), metrics_cache_dir(),
                          conditional=class_labels is not None)
    scores = scorer.score(images, class_labels)
    return {"sigma_rel": sigma_rel, "step": step, "checkpoint": str(checkpoint),
            "profile_error": info["profile_error"], "metric": scorer.primary,
            **{name: scores[name] for name in scorer.extractors}}


@task
def log_posthoc_sweep(run_id: str, rows: list[dict], fixed: dict, ema_decay: float, ema_warmup: bool = True) -> dict:
    """Log the sweep on MLflow run `run_id` and choose: the table evaluation/posthoc_ema.json, the
    plot plots/posthoc_ema.png, `posthoc_ema.<metric>_best`, `posthoc_ema.fixed_<metric>`; when
    the best reconstruction beats the run's own EMA (`fixed`: {"step", <metric>: FID}), it is
    logged as a model of the run (tagged with its width) and the run's posthoc_ema.* tags point
    at it. Returns {"chosen": "reconstruction" | "fixed", "best": row, "rows": rows}."""
    scored = [r for r in rows if "skipped" not in r]
    if not scored:
        raise PosthocEMAError("no width of the sweep could be reconstructed: " + "; ".join(r["skipped"] for r in rows))
    metric = scored[0]["metric"]
    best = min(scored, key=lambda r: r[metric])
    fixed_fid = fixed.get(metric)
    fixed_width = fixed_ema_sigma_rel(ema_decay, fixed["step"], ema_warmup)
    mlflow_client = tracking.client()
    columns = ["sigma_rel", "step", metric, "profile_error"]
    # MLflow's table format, written whole: log_table would append to an earlier sweep's rows
    tracking.log_dict(run_id, {"columns": columns, "data": [[r[key] for key in columns] for r in scored]},
                      contract.POSTHOC_TABLE)
    label = f"the run's EMA (decay {ema_decay:g}, sigma_rel ~{fixed_width:.2f})"
    plots.log_figure(run_id, lambda: plots.posthoc_ema_plot(scored, metric, fixed_fid, label), contract.POSTHOC_PLOT)
    now = int(time.time() * 1000)
    metrics = [tracking.Metric(contract.POSTHOC_METRIC_PREFIX + metric + contract.BEST_SUFFIX, best[metric], now,
                               best["step"])]
    if fixed_fid is not None:
        metrics.append(tracking.Metric(f"{contract.POSTHOC_METRIC_PREFIX}fixed_{metric}", fixed_fid, now, fixed["step"]))
    mlflow_client.log_batch(run_id, metrics=metrics)
    chosen = "reconstruction" if fixed_fid is None or best[metric] < fixed_fid else "fixed"
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
    return {"chosen": chosen, "best": best, "rows": rows, "metric": metric, "fixed": fixed_fid}

"""Figures logged to MLflow: loss curves, noise schedules, the guidance sweep, precision against recall.

Figures are plain `matplotlib.figure.Figure` objects (no pyplot global state, nothing to
close). Matplotlib's text layout is not thread-safe and runs of a schedule comparison plot in
parallel threads, so building and saving a figure happen under `RENDER_LOCK`; `log_figure`
below does both.
"""

from __future__ import annotations

import threading
from typing import Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RENDER_LOCK = threading.Lock()


def _new_figure() -> tuple[Figure, object]:
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def loss_curve(history: list[tuple[int, float]], title: str = "training loss") -> Figure:
    figure, axis = _new_figure()
    if history:
        steps, losses = zip(*history)
        axis.plot(steps, losses)
    axis.set_xlabel("step")
    axis.set_ylabel("MSE loss")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def schedule_plot(schedules: dict[str, "object"], annotations: dict[str, str] | None = None) -> Figure:
    """alphas_cumprod against t/T for each named NoiseSchedule (with e.g. its FID in the legend)."""
    figure, axis = _new_figure()
    for name, schedule in schedules.items():
        T = schedule.num_timesteps
        label = f"{name} ({annotations[name]})" if annotations and name in annotations else name
        axis.plot([t / T for t in range(T)], schedule.alphas_cumprod.numpy(), label=label)
    axis.set_xlabel("t / T")
    axis.set_ylabel("alphas_cumprod (signal kept)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def guidance_sweep_plot(rows: list[dict], metric: str) -> Figure:
    """FID (`metric`, left axis) and conditional accuracy (right axis) against the guidance scale w."""
    figure, axis = _new_figure()
    scales = [r["guidance_scale"] for r in rows]
    axis.plot(scales, [r[metric] for r in rows], "o-", color="tab:blue", label=metric)
    axis.set_xlabel("guidance scale w (0 unconditional, 1 conditional)")
    axis.set_ylabel(metric, color="tab:blue")
    axis.grid(alpha=0.3)
    if all(r.get("conditional_accuracy") is not None for r in rows):
        right = axis.twinx()
        right.plot(scales, [100 * r["conditional_accuracy"] for r in rows], "s--", color="tab:red")
        right.set_ylabel("conditional accuracy (%)", color="tab:red")
    axis.set_title("classifier-free guidance: quality against fidelity to the class")
    figure.tight_layout()
    return figure


def log_figure(run_id: str, make_figure: Callable[[], Figure], artifact_file: str) -> None:
    """Build a figure and log it as an image artifact of MLflow run `run_id`, under the lock."""
    from tasks import tracking

    with RENDER_LOCK:
        tracking.log_figure(run_id, make_figure(), artifact_file)


def posthoc_ema_plot(rows: list[dict], metric: str, fixed: float | None, fixed_label: str) -> Figure:
    """FID (`metric`) against the post-hoc EMA width sigma_rel, one line per reconstructed step;
    the run's own (fixed-decay) EMA as a horizontal line."""
    figure, axis = _new_figure()
    for step in sorted({r["step"] for r in rows}):
        chosen = [r for r in rows if r["step"] == step]
        axis.plot([r["sigma_rel"] for r in chosen], [r[metric] for r in chosen], "o-", label=f"post-hoc, step {step}")
    if fixed is not None:
        axis.axhline(fixed, color="tab:gray", linestyle="--", label=fixed_label)
    axis.set_xscale("log")
    axis.set_xlabel("EMA width sigma_rel (std of the averaging profile / training length)")
    axis.set_ylabel(metric)
    axis.set_title("post-hoc EMA: the EMA length chosen after training")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def precision_recall_plot(rows: list[dict], label: str = "schedule") -> Figure:
    """Each row's precision (fidelity: samples inside the data's manifold) against its recall
    (diversity: data inside the samples' manifold), labelled by `label`, its primary metric beside it."""
    figure, axis = _new_figure()
    for row in rows:
        if row.get("precision") is None or row.get("recall") is None:
            continue
        axis.scatter(row["recall"], row["precision"], s=40)
        axis.annotate(f"{row[label]} ({row['metric']} {row['fid']:.3g})", (row["recall"], row["precision"]),
                      textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xlim(0, 1.05)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("recall (diversity: data covered by the samples)")
    axis.set_ylabel("precision (fidelity: samples inside the data)")
    axis.set_title("improved precision and recall (k = 3)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure

"""Figures logged to MLflow: loss curves and noise schedules."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(history: list[tuple[int, float]], title: str = "training loss"):
    figure, axis = plt.subplots(figsize=(6, 3.5))
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


def schedule_plot(schedules: dict[str, "object"], annotations: dict[str, str] | None = None):
    """alphas_cumprod against t/T for each named NoiseSchedule (with e.g. its FID in the legend)."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
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

"""The sampling task and the progress grids: images from a checkpoint's EMA weights (ddpm.sampling),
saved as .npz + a PNG grid and logged to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from prefect import task

from ddpm.images import make_grid, save_grid
from ddpm.samplers import SamplerConfig
from ddpm.sampling import checkpoint_images, grid_images, save_samples
from ddpm.training import resolve_device
from tasks import contract, tracking


def progress_grid(run_id: str, num_images: int, device: str = "cpu") -> Callable[[int, Path], None]:
    """An `on_checkpoint(step, path)` callback: `num_images` images from each new checkpoint's EMA
    weights (the default sampler, the same seeds every time, on `device`), logged to MLflow run
    `run_id` as the image `progress` at that step, so the UI's image slider shows the model learning."""
    sampling = SamplerConfig(num_images=num_images, batch_size=num_images)
    device = resolve_device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []

    def log_grid(step: int, checkpoint: Path) -> None:
        try:
            # training's random streams stay as a resume from this checkpoint restores them
            with torch.random.fork_rng(devices=cuda_devices):
                images_uint8, _, class_labels = checkpoint_images(str(checkpoint), sampling, device=device)
            shown, row_length = grid_images(images_uint8, class_labels)
            grid = make_grid(shown, nrow=row_length)
            if images_uint8.shape[-1] <= 32:   # enlarged as the sample grids are, or the UI shows specks
                grid = grid.repeat(4, axis=0).repeat(4, axis=1)
            tracking.client().log_image(run_id, grid, key=contract.PROGRESS_IMAGE, step=step)
        except Exception as error:   # a picture is not worth a training: say so and go on
            logging.getLogger(__name__).warning(f"no progress grid at step {step}: {type(error).__name__}: {error}")

    return log_grid


@task
def sample_checkpoint(
    checkpoint: str,
    sampling: SamplerConfig,
    out_dir: str,
    run_id: str | None = None,
    use_ema: bool = True,
    device: str = "auto",
) -> dict:
    """Draw `sampling.num_images` images; write samples-<step>-<sampler>.npz (uint8 `images`, and
    for a class-conditional model the `labels` asked for and the `guidance_scale`) and a grid PNG.

    With `run_id`, the grid and the sampler settings are logged to that MLflow run, and the grid
    also as the run's image `samples` at this training step: sampling every checkpoint (the
    evaluate flow) fills the MLflow UI's image slider with the model's progress.
    """
    images_uint8, step, class_labels = checkpoint_images(checkpoint, sampling, use_ema, device, progress=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"samples-{step:07d}-{sampling.describe()}"
    npz_path = save_samples(images_uint8, class_labels, sampling.guidance(), out / f"{name}.npz")
    shown, row_length = grid_images(images_uint8, class_labels)
    grid_path = save_grid(shown, out / f"{name}.png", nrow=row_length, scale=4 if images_uint8.shape[-1] <= 32 else 1)
    if run_id:  # settings as a file beside the grid: one run may be sampled many ways
        tracking.log_file(run_id, grid_path, contract.SAMPLES_FOLDER)
        with Image.open(grid_path) as grid:
            tracking.client().log_image(run_id, grid, key=contract.SAMPLES_IMAGE, step=step)
        tracking.log_dict(run_id, {"checkpoint": checkpoint, "step": step, "use_ema": use_ema,
                                   **sampling.model_dump()}, f"{contract.SAMPLES_FOLDER}/{name}.json")
    return {"npz": str(npz_path), "grid": str(grid_path), "step": step, "num_images": int(images_uint8.shape[0])}

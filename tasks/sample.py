"""The sampling task: images from a checkpoint's EMA weights, saved as .npz + a PNG grid."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from prefect import task

from ddpm.images import make_grid, save_grid, to_uint8
from ddpm.progress import progress_bar
from ddpm.checkpoint import load_model
from ddpm.samplers import SamplerConfig, generate
from ddpm.training import resolve_device
from tasks import tracking


def load_sampler(checkpoint: str, sampling: SamplerConfig, use_ema: bool = True, device="cpu"):
    """(model, sampler, training step) of a checkpoint: its EMA weights by default, and the
    sampler `sampling` describes over the checkpoint's own noise schedule."""
    model, diffusion_config, state = load_model(checkpoint, use_ema=use_ema, device=device)
    sampler = sampling.build(diffusion_config.make_schedule(), diffusion_config.prediction_type)
    return model, sampler, int(state["step"])


def checkpoint_images(checkpoint: str, sampling: SamplerConfig, use_ema: bool = True, device: str = "cpu",
                      progress: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """`sampling.num_images` uint8 images (N, C, H, W) from a checkpoint, its training step, and
    the class each image was asked to show (None for an unconditional model)."""
    device = resolve_device(device)
    model, sampler, step = load_sampler(checkpoint, sampling, use_ema, device)
    images, class_labels = draw_images(model, sampler, sampling, device, progress)
    return images, step, class_labels


def draw_images(model, sampler, sampling: SamplerConfig, device, progress: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sampling.num_images` uint8 images from a loaded model and sampler (load_sampler), and the
    class each was asked to show (None for an unconditional model)."""
    class_labels = sampling.class_labels(model.config.num_classes)
    bar = (lambda steps: progress_bar(steps, desc=f"sample {sampling.describe()}", leave=False)) if progress else None
    images = generate(model, sampler, sampling.num_images, seed=sampling.seed, batch_size=sampling.batch_size,
                      device=device, progress=bar, class_labels=class_labels, guidance_scale=sampling.guidance())
    return to_uint8(images), class_labels


def grid_images(images_uint8: torch.Tensor, class_labels: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
    """(the images a grid shows, its row length): the first 64, or for class-conditional samples
    one row per class (up to 16 classes, up to 8 images each)."""
    if class_labels is None:
        return images_uint8[:64], None
    classes = class_labels.unique().tolist()[:16]
    per_class = min(8, *(int((class_labels == k).sum()) for k in classes))
    return torch.cat([images_uint8[class_labels == k][:per_class] for k in classes]), per_class


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
            tracking.client().log_image(run_id, grid, key="progress", step=step)
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
    npz_path = out / f"{name}.npz"
    conditioning = {} if class_labels is None else {"labels": class_labels.numpy(),
                                                    "guidance_scale": np.float64(sampling.guidance())}
    np.savez(npz_path, images=images_uint8.numpy(), **conditioning)
    shown, row_length = grid_images(images_uint8, class_labels)
    grid_path = save_grid(shown, out / f"{name}.png", nrow=row_length, scale=4 if images_uint8.shape[-1] <= 32 else 1)
    if run_id:  # settings as a file beside the grid: one run may be sampled many ways
        tracking.log_file(run_id, grid_path, "samples")
        with Image.open(grid_path) as grid:
            tracking.client().log_image(run_id, grid, key="samples", step=step)
        tracking.log_dict(run_id, {"checkpoint": checkpoint, "step": step, "use_ema": use_ema,
                                   **sampling.model_dump()}, f"samples/{name}.json")
    return {"npz": str(npz_path), "grid": str(grid_path), "step": step, "num_images": int(images_uint8.shape[0])}

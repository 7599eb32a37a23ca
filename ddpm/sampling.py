"""Images from a checkpoint: load its EMA weights with a sampler, draw, save, lay out in grids.

    model, sampler, step = load_sampler("step-0001500.pt", SamplerConfig())
    images, labels = draw_images(model, sampler, SamplerConfig(num_images=64), "cpu")   # uint8 (N, C, H, W)
    images, step, labels = checkpoint_images("step-0001500.pt", SamplerConfig(num_images=64))   # the two above
    save_samples(images, labels, guidance, "samples.npz")      # what scoring reads (ddpm.metrics.scoring)

The pipeline's sampling task, its progress grids and the `ddpm sample` command all draw through
these; ddpm.samplers holds the samplers themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.checkpoint import load_model
from ddpm.images import save_grid, save_png, to_uint8
from ddpm.progress import progress_bar
from ddpm.samplers import SamplerConfig, generate
from ddpm.training import resolve_device


def load_sampler(checkpoint: str | Path, sampling: SamplerConfig, use_ema: bool = True, device="cpu"):
    """(model, sampler, training step) of a checkpoint: its EMA weights by default, and the
    sampler `sampling` describes over the checkpoint's own noise schedule."""
    model, diffusion_config, state = load_model(checkpoint, use_ema=use_ema, device=device)
    sampler = sampling.build(diffusion_config.make_schedule(), diffusion_config.prediction_type)
    return model, sampler, int(state["step"])


def draw_images(model, sampler, sampling: SamplerConfig, device, progress: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sampling.num_images` uint8 images from a loaded model and sampler (load_sampler), and the
    class each was asked to show (None for an unconditional model)."""
    class_labels = sampling.class_labels(model.config.num_classes)
    bar = (lambda steps: progress_bar(steps, desc=f"sample {sampling.describe()}", leave=False)) if progress else None
    images = generate(model, sampler, sampling.num_images, seed=sampling.seed, batch_size=sampling.batch_size,
                      device=device, progress=bar, class_labels=class_labels, guidance_scale=sampling.guidance())
    return to_uint8(images), class_labels


def checkpoint_images(checkpoint: str | Path, sampling: SamplerConfig, use_ema: bool = True, device: str = "cpu",
                      progress: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """`sampling.num_images` uint8 images (N, C, H, W) from a checkpoint, its training step, and
    the class each image was asked to show (None for an unconditional model)."""
    device = resolve_device(device)
    model, sampler, step = load_sampler(checkpoint, sampling, use_ema, device)
    images, class_labels = draw_images(model, sampler, sampling, device, progress)
    return images, step, class_labels


def save_samples(images_uint8: torch.Tensor, class_labels: torch.Tensor | None, guidance_scale: float | None,
                 path: Path | str) -> Path:
    """An .npz of uint8 `images`, and for a class-conditional model the `labels` asked for and the
    `guidance_scale`: the samples file scoring reads (ddpm.metrics.scoring.load_samples)."""
    conditioning = {} if class_labels is None else {"labels": class_labels.numpy(),
                                                    "guidance_scale": np.float64(guidance_scale)}
    np.savez(path, images=images_uint8.numpy(), **conditioning)
    return Path(path)


def grid_images(images_uint8: torch.Tensor, class_labels: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
    """(the images a grid shows, its row length): the first 64, or for class-conditional samples
    one row per class (up to 16 classes, up to 8 images each)."""
    if class_labels is None:
        return images_uint8[:64], None
    classes = class_labels.unique().tolist()[:16]
    per_class = min(8, *(int((class_labels == k).sum()) for k in classes))
    return torch.cat([images_uint8[class_labels == k][:per_class] for k in classes]), per_class


def grid_scale(image_size: int) -> int:
    """Small images are enlarged in grids so that they can be seen (to about 128 pixels)."""
    return max(1, 128 // image_size) if image_size < 128 else 1


def write_images(images: np.ndarray, out_dir: Path | str, prefix: str = "image") -> dict:
    """One PNG per uint8 (C, H, W) image (prefix-000.png, ...) and grid.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_png(np.transpose(image, (1, 2, 0)), out / f"{prefix}-{i:03d}.png") for i, image in enumerate(images)]
    grid = save_grid(torch.from_numpy(images), out / "grid.png", scale=grid_scale(images.shape[-1]))
    return {"images": [str(p) for p in paths], "grid": str(grid)}

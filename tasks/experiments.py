"""What a person does with a trained model at a terminal: sample, interpolate, denoise -> PNG files.

Plain functions (no Prefect): the `ddpm` command calls them directly, flows may wrap them.
Images come from a checkpoint file or from a registered model (`models:/<name>@<alias>` or
`models:/<name>/<version>`); real images for interpolation and denoising come from a prepared
dataset folder or a DataConfig source, picked by index in one of its splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.data import DataConfig, DataError, load_prepared, prepare_dataset, prepared_path
from ddpm.images import save_grid, to_float
from ddpm.samplers import SamplerConfig, denoise, interpolate
from ddpm.sampling import checkpoint_images, grid_scale, load_sampler
from tasks import tracking
from tasks.settings import ddpm_home, redact


def is_model_uri(source: str) -> bool:
    return str(source).startswith("models:/")


def sample_images(source: str, sampling: SamplerConfig) -> np.ndarray:
    """uint8 (N, C, H, W) images from a checkpoint file or a registered model URI."""
    if is_model_uri(source):
        import mlflow.pyfunc

        from mlflow.exceptions import MlflowException

        tracking.client()  # points MLflow at the project's store
        try:
            model = mlflow.pyfunc.load_model(source)
        except MlflowException as error:  # unknown name, alias or version
            raise LookupError(f"{source}: {error.message} (tracking URI {redact(tracking.tracking_uri())})") from None
        return np.asarray(model.predict({"num_images": sampling.num_images}, params={
            "seed": sampling.seed, "sampler": sampling.sampler, "steps": sampling.num_steps or 0,   # 0: the sampler's default
            "eta": sampling.eta, "format": "uint8",
            "class": sampling.classes[0] if sampling.classes else -1,   # -1: every class in turn
            "guidance": -1.0 if sampling.guidance_scale is None else sampling.guidance_scale}))
    if not Path(source).is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    return checkpoint_images(source, sampling, progress=True)[0].numpy()   # 1000 DDPM steps take minutes


def real_images(dataset: str, indices: list[int], split: str = "holdout") -> torch.Tensor:
    """Float images in [-1, 1] at `indices` of a split, from a prepared folder or a source name.

    A path to a prepared dataset folder is used as is; anything else is a DataConfig source
    ("digits", "mnist:DIR", ...) prepared (or found already prepared) under $DDPM_HOME/data.
    """
    if Path(dataset).is_dir():
        prepared = load_prepared(Path(dataset))
    else:
        config, out_dir = DataConfig(source=dataset), ddpm_home(create=True) / "data"
        try:  # prepared before (e.g. by the pipeline): reuse it; prepare_dataset would redo it
            prepared = load_prepared(prepared_path(config, out_dir))
        except DataError:
            prepared = load_prepared(prepare_dataset(config, out_dir))
    images, _ = prepared.split(split)
    for index in indices:
        if not 0 <= index < len(images):
            raise IndexError(f"image index {index} is out of range: the {split} split has {len(images)} images")
    return to_float(images[indices])


def log_to_run(run_id: str | None, path: Path | str, artifact_path: str) -> None:
    if run_id:
        tracking.log_file(run_id, path, artifact_path)


def interpolation_grid(checkpoint: str, x0_a: torch.Tensor, x0_b: torch.Tensor, t: int, num_lambdas: int,
                       sampling: SamplerConfig, out_path: Path | str, run_id: str | None = None) -> dict:
    """One row: image a, the decoded mixtures of their diffused latents at t for lambda 0..1, image b."""
    model, sampler, _ = load_sampler(checkpoint, sampling)
    lambdas = np.linspace(0.0, 1.0, num_lambdas).tolist()
    mixed = interpolate(model, sampler, x0_a, x0_b, lambdas, t, seed=sampling.seed)
    row = torch.cat([x0_a.reshape(1, *mixed.shape[1:]), mixed, x0_b.reshape(1, *mixed.shape[1:])])
    path = save_grid(row, out_path, nrow=len(row), scale=grid_scale(row.shape[-1]))
    log_to_run(run_id, path, "interpolation")
    return {"grid": str(path), "lambdas": lambdas, "t": t}


def denoising_grid(checkpoint: str, x0: torch.Tensor, timesteps: list[int], sampling: SamplerConfig,
                   out_path: Path | str, run_id: str | None = None) -> dict:
    """Rows per t: the real images, then x_t, then the reconstruction from x_t (one column per image)."""
    model, sampler, _ = load_sampler(checkpoint, sampling)
    rows = [x0]
    for t in timesteps:
        x_t, reconstruction = denoise(model, sampler, x0, t, seed=sampling.seed)
        rows += [x_t, reconstruction]
    grid = torch.cat(rows)
    path = save_grid(grid, out_path, nrow=len(x0), scale=grid_scale(grid.shape[-1]))
    log_to_run(run_id, path, "denoising")
    return {"grid": str(path), "timesteps": timesteps}

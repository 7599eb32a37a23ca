"""Test helpers: a tiny trained checkpoint and MLflow runs that look like train_pipeline's."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ddpm.diffusion import DiffusionConfig
from ddpm.training import Trainer, TrainConfig
from ddpm.unet import preset

TINY_MODEL = preset("tiny-16", base_channels=8, num_groups=4)
TINY_DIFFUSION = DiffusionConfig(num_timesteps=100)


def tiny_checkpoint(directory: Path, steps: int = 2, num_classes: int | None = None) -> Path:
    """Train the tiny UNet (class-conditional with `num_classes`) for `steps` steps on noise
    images; the last checkpoint's path."""
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=0, log_every=1, checkpoint_every=steps,
                         ema_decay=0.9, device="cpu")
    batches = lambda i: torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1  # noqa: E731
    model = TINY_MODEL
    if num_classes:
        model = TINY_MODEL.model_copy(update={"num_classes": num_classes})
        images = batches
        batches = lambda i: (images(i), torch.arange(4) % num_classes)  # noqa: E731
    trainer = Trainer(model, TINY_DIFFUSION, config, batches, directory)
    return trainer.train(progress=False).checkpoints[-1]


def fake_trained_run(client: MlflowClient, experiment: str, checkpoint: Path, fid: float,
                     fingerprint: str = "data-a", metric: str = "fid_classifier", schedule: str = "linear",
                     status: str = "FINISHED", num_samples: int = 500, conditional: bool | None = None) -> str:
    """An MLflow run tagged and measured like train_pipeline's, its checkpoint in $DDPM_HOME/runs/<id>."""
    from tasks.settings import run_dir

    from tasks.tracking import experiment_id as pipeline_experiment_id

    experiment_id = pipeline_experiment_id(experiment)  # as the pipeline makes it: artifacts in DDPM_HOME
    run = client.create_run(experiment_id, tags={"dataset.fingerprint": fingerprint, "schedule": schedule,
                                                 "fid.metric": metric, "fid.num_samples": str(num_samples),
                                                 # None: a run from before the tag existed
                                                 **({} if conditional is None else
                                                    {"model.conditional": str(conditional).lower()})})
    run_id = run.info.run_id
    step = int(checkpoint.stem.split("-")[1])
    client.log_batch(run_id, metrics=[Metric(metric, fid, int(time.time() * 1000), step)])
    out = run_dir(run_id) / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    for path in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256")):
        shutil.copy(path, out / path.name)
    client.set_terminated(run_id, status)
    time.sleep(0.01)  # distinct end times: "newest run" is well defined
    return run_id

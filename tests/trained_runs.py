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


def assert_equals_uninterrupted(client: MlflowClient, run_id: str, home: Path, folder: Path, tmp_path: Path,
                                steps: int) -> None:
    """The newest checkpoint in `folder` (of run `run_id`, trained by the CLI in one thread with the
    prepared data in `home`) holds, bit for bit, the weights and EMA of an uninterrupted training
    of the run's own configuration (its config.json)."""
    import json

    from ddpm.checkpoint import list_checkpoints, load_checkpoint
    from ddpm.training import dataset_trainer
    from ddpm.unet import UNetConfig

    config = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())
    # prepared here, or fetched from the tracking store by a host that resumed the run (tasks.run_files)
    dataset = next(p for pattern in ("data/*/manifest.json", "cache/datasets/*/manifest.json")
                   for p in home.glob(pattern)).parent
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = dataset_trainer(dataset, UNetConfig(**config["model"]), DiffusionConfig(**config["diffusion"]),
                                   TrainConfig(**config["train"]), tmp_path / "straight")
        straight.train(progress=False)
    finally:
        torch.set_num_threads(previous)
    final = load_checkpoint(list_checkpoints(folder)[-1])
    assert final["step"] == straight.step == steps
    expected = {"model": straight.model.state_dict(), "ema": straight.ema.state_dict()}
    for part in ("model", "ema"):
        assert final[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(final[part][key], value), f"{part}.{key} differs"

"""What the side-by-side benchmarks share: the diffusers twin of each UNet preset, the MNIST
16x16 data, the pipeline's scorer (fid_classifier first, with its real-vs-real floor), and machine facts.

Benchmarks run from a checkout (`python benchmarks/<name>.py`); diffusers comes from the `bench`
extra and is imported only where a benchmark needs it.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout, not installed

from ddpm.data import PreparedDataset, load_prepared  # noqa: E402
from ddpm.data.prepare import DataConfig, prepare_dataset  # noqa: E402
from ddpm.images import to_uint8  # noqa: E402
from ddpm.metrics.scoring import Scorer  # noqa: E402
from ddpm.samplers import generate  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"

# The diffusers UNet2DModel equal to each preset: same channels, blocks, attention, groups and
# parameter count (diffusers' up blocks have layers_per_block + 1 resnets, as the DDPM code does).
DIFFUSERS_CONFIGS = {
    "ddpm-cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=32, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
    ),
    "small-16": dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=8, attention_head_dim=None,
    ),
    "tiny-16": dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        dropout=0.0, norm_num_groups=8, attention_head_dim=None,
    ),
    "tiny-32": dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        dropout=0.0, norm_num_groups=8, attention_head_dim=None,
    ),
}


def diffusers_unet(preset_name: str):
    from diffusers import UNet2DModel

    return UNet2DModel(**DIFFUSERS_CONFIGS[preset_name])


@dataclass(frozen=True)
class ImageShape:
    in_channels: int
    image_size: int


class DiffusersEpsModel(nn.Module):
    """A UNet2DModel seen through our model interface (`model(x, t) -> eps`, `model.config`), so
    our samplers can drive diffusers' weights."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = ImageShape(unet.config.in_channels, unet.config.sample_size)

    def forward(self, x, t):
        return self.unet(x, t).sample


def prepare_mnist(out_dir: Path, image_size: int = 16, mnist_dir: Path | None = None) -> PreparedDataset:
    """MNIST (by default the test split in ../shared) at image_size, split by the project's seeded preparation."""
    mnist_dir = mnist_dir or MNIST_DIR
    if not (Path(mnist_dir) / "t10k-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"no MNIST files in {mnist_dir}; pass --mnist DIR")
    config = DataConfig(source=f"mnist:{Path(mnist_dir).resolve()}", image_size=image_size)
    return load_prepared(prepare_dataset(config, Path(out_dir) / "data"))


def make_scorer(dataset: PreparedDataset, cache_dir: Path, inception: bool = False) -> Scorer:
    """The pipeline's scorer (ddpm.metrics.scoring) with fid_classifier as its primary metric
    (`fid`, `floor`), and with `inception` also fid_inception (`fids`, `floors` give each by name)."""
    return Scorer.build(dataset, ["classifier", *(["inception"] if inception else [])], cache_dir)


def recipe_steps(images_uint8: torch.Tensor, minutes: float, probe_steps: int = 20) -> int:
    """How many steps of the pipeline's recipe on tiny-16 fit in `minutes` on this machine (timed
    over `probe_steps` steps of a throwaway trainer, after one warm-up step)."""
    from ddpm.data import BatchLoader
    from ddpm.training import Trainer
    from ddpm.unet import preset
    from tasks.config import DEFAULTS

    probe = Trainer(preset("tiny-16"), DEFAULTS.diffusion, DEFAULTS.train.model_copy(update={"device": "cpu"}),
                    BatchLoader(images_uint8, DEFAULTS.train.batch_size, seed=0).batch)
    probe.train_step()
    start = time.perf_counter()
    for _ in range(probe_steps):
        probe.train_step()
    return int(60 * minutes / ((time.perf_counter() - start) / probe_steps))


def timed_samples(model, sampler, num_images: int, seed: int = 0, batch_size: int = 250) -> tuple[torch.Tensor, float]:
    """(uint8 images, seconds per image) from our `generate`."""
    start = time.perf_counter()
    images = generate(model, sampler, num_images, seed=seed, batch_size=batch_size)
    return to_uint8(images), (time.perf_counter() - start) / num_images


@torch.no_grad()
def diffusers_samples(unet, scheduler, num_steps: int, num_images: int, seed: int = 0, batch_size: int = 250,
                      **step_options) -> tuple[torch.Tensor, float]:
    """(uint8 images, seconds per image) the way DDPMPipeline / DDIMPipeline draw them: seeded
    Gaussian noise, then `scheduler.step` at each of its timesteps (step_options: eta, ...)."""
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:   # stochastic steps (UniPC has none)
        step_options = {"generator": generator, **step_options}
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    batches = []
    start = time.perf_counter()
    for first in range(0, num_images, batch_size):
        scheduler.set_timesteps(num_steps)   # multistep schedulers keep a step index: reset per batch
        x = torch.randn((min(batch_size, num_images - first), *shape), generator=generator)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, **step_options).prev_sample
        batches.append(x)
    seconds = (time.perf_counter() - start) / num_images
    return to_uint8(torch.cat(batches).clamp(-1, 1)), seconds


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "diffusers": diffusers_version, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def cached_json(path: Path, compute, announce: bool = False):
    """The JSON result at `path` when a previous run left it there, else `compute()`, saved there."""
    if path.exists():
        if announce:
            print(f"  (reusing {path})")
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


# --- diffusers' unconditional training example, as the peer recipe ------------------------------

PROGRESS_EVERY_S = 60


def train_diffusers(model_name: str, images_uint8: torch.Tensor, batch: int, seed: int, minutes: float,
                    epochs: int | None, out: Path, snapshot_minutes: tuple[float, ...] = ()) -> dict:
    """diffusers' examples/unconditional_image_generation/train_unconditional.py, its defaults: AdamW
    lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, cosine schedule with 500 warm-up steps over
    `epochs` (None: as many as fit in `minutes`, from the speed of 50 probe steps), grad-norm clip 1,
    EMAModel with warm-up (inv_gamma 1, power 3/4, max 0.9999), linear betas, T=1000.

    Cut off after `minutes`; saves the EMA weights to out/diffusers-ema.pt, and at each of
    `snapshot_minutes` to out/diffusers-ema-<minutes>min.pt (listed in the result's "snapshots").
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = diffusers_unet(model_name).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    data = images_uint8.float() / 127.5 - 1.0   # ToTensor + Normalize([0.5], [0.5])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    if epochs is None:
        epochs = max(1, round(60 * minutes / probe_seconds_per_step(model, noise_scheduler, batch) / len(loader)))
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=len(loader) * epochs)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

    def save_ema(path: Path) -> None:
        snapshot = copy.deepcopy(model)
        ema.copy_to(snapshot.parameters())
        torch.save(snapshot.state_dict(), path)

    step, losses, curve, snapshots = 0, [], [], {}
    pending = sorted(m for m in snapshot_minutes if m < minutes)
    start = last_report = time.perf_counter()
    deadline = start + 60 * minutes
    done = False
    for _ in range(epochs):
        for (clean,) in loader:
            noise = torch.randn(clean.shape)
            timesteps = torch.randint(0, 1000, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            ema.step(model.parameters())
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.detach().item())
            now = time.perf_counter()
            if pending and now - start >= 60 * pending[0]:
                path = out / f"diffusers-ema-{pending.pop(0):g}min.pt"
                save_ema(path)
                snapshots[str(path)] = {"step": step, "seconds": now - start}
            if now - last_report >= PROGRESS_EVERY_S:
                curve.append((step, float(np.mean(losses[-100:]))))
                print(f"  diffusers step {step} loss {curve[-1][1]:.4f} ({(now - start) / 60:.1f} min)", flush=True)
                last_report = now
            if now >= deadline:
                done = True
                break
        if done:
            break
    seconds = time.perf_counter() - start
    save_ema(out / "diffusers-ema.pt")
    snapshots[str(out / "diffusers-ema.pt")] = {"step": step, "seconds": seconds}
    return {"steps": step, "seconds": seconds, "images_per_second": step * batch / seconds, "epochs": epochs,
            "schedule_steps": len(loader) * epochs, "final_loss": float(np.mean(losses[-100:])),
            "loss_curve": curve, "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": str(out / "diffusers-ema.pt"), "snapshots": snapshots}


def probe_seconds_per_step(model, noise_scheduler, batch: int, steps: int = 50) -> float:
    """Seconds per training step of a throwaway copy of `model` (the real one stays untouched)."""
    probe = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    size = probe.config.sample_size
    clean = torch.randn(batch, probe.config.in_channels, size, size)
    start = time.perf_counter()
    for _ in range(steps):
        noise, timesteps = torch.randn(clean.shape), torch.randint(0, 1000, (batch,))
        F.mse_loss(probe(noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps

"""MNIST at full size with the standard metric: our `mnist` recipe against diffusers'
train_unconditional recipe at equal CPU minutes, Inception FID against the 10,000 test images.

Data: the four official MNIST files (md5-verified), the official split (train on the 60,000,
reference = the 10,000 test images), 28x28 padded to 32x32 (tasks.config.RECIPES["mnist"]).
Model: tiny-32 (280,177 parameters) and its diffusers twin (UNet2DModel, same parameter count).

1. diffusers: trained as its unconditional example does by default (benchmarks/common.py
   train_diffusers: AdamW 1e-4, cosine schedule sized to end with the budget, EMAModel with
   warm-up, linear betas) for --minutes of wall clock.
2. ours: the `mnist` recipe (cosine noise schedule, lr 4e-3 with cosine decay, EMA 0.999) for
   the same minutes: its step count is sized from the speed of 20 probe steps so the decay ends
   with the budget, and it is cut off at the deadline all the same.
3. Snapshots of the EMA weights at each of --curve minutes give the FID-vs-minutes curve: every
   snapshot is sampled with the same sampler (ours: DDIM-50, eta 1, over the schedule each model
   was trained with), --samples images, scored with fid_inception and fid_classifier against the
   10,000 test images, beside each metric's real-vs-real floor at the same count. diffusers'
   final weights are also sampled with its own DDIMScheduler (50 steps, the DDIMPipeline default).

    python benchmarks/mnist_full.py [--minutes 15] [--curve 5 10] [--samples 1000] [--mnist DIR]

Each phase saves its result under --out and is skipped when rerun (--fresh to redo all). The
Inception statistics of the 10,000 reference images (~25 min on 2 cores) are cached in --out/cache.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    DiffusersEpsModel, ROOT, make_scorer, cached_json, diffusers_samples, diffusers_unet, machine, timed_samples,
    train_diffusers, write_json,
)

from ddpm.data import BatchLoader, DataConfig, PreparedDataset, load_prepared, prepare_dataset
from ddpm.diffusion import DiffusionConfig
from ddpm.images import save_grid
from ddpm.samplers import SamplerConfig
from ddpm.checkpoint import load_model
from ddpm.training import Trainer
from ddpm.unet import count_parameters
from tasks.config import DEFAULTS, recipe as pipeline_recipe

MNIST_FULL_DIR = ROOT.parent / "shared" / "data" / "mnist-full"
SAMPLER = SamplerConfig(sampler="ddim", num_steps=50, eta=1.0)   # DDIM-50 eta 1 (section 6's sampler), both sides
PROGRESS_EVERY_S = 60


def prepare(out: Path, mnist_dir: Path) -> PreparedDataset:
    config = DataConfig(**{**pipeline_recipe("mnist").data.model_dump(), "source": f"mnist:{Path(mnist_dir).resolve()}"})
    return load_prepared(prepare_dataset(config, out / "data"))


def train_ours(images_uint8: torch.Tensor, seed: int, minutes: float, snapshot_minutes, out: Path) -> dict:
    """The `mnist` recipe for `minutes`, with checkpoints (EMA inside) at each snapshot minute."""
    recipe = pipeline_recipe("mnist")
    batch = recipe.train.batch_size
    probe = Trainer(recipe.model, DEFAULTS.diffusion, recipe.train.model_copy(update={"device": "cpu"}),
                    BatchLoader(images_uint8, batch, seed=seed).batch)
    probe.train_step()   # first step pays one-off allocation costs
    start = time.perf_counter()
    for _ in range(20):
        probe.train_step()
    steps = int(60 * minutes / ((time.perf_counter() - start) / 20))
    del probe
    train = recipe.train.model_copy(update={"steps": steps, "seed": seed, "device": "cpu",
                                               "checkpoint_every": 10**9, "keep_last": 10})
    shutil.rmtree(out / "ours", ignore_errors=True)   # a crashed earlier attempt: start clean
    trainer = Trainer(recipe.model, DEFAULTS.diffusion, train, BatchLoader(images_uint8, batch, seed=seed).batch,
                      checkpoint_dir=out / "ours")
    pending = sorted(m for m in snapshot_minutes if m < minutes)
    losses, curve, snapshots = [], [], {}
    start = last_report = time.perf_counter()
    deadline = start + 60 * minutes
    while trainer.step < steps:
        losses.append(trainer.train_step()[0])
        now = time.perf_counter()
        if pending and now - start >= 60 * pending[0]:
            pending.pop(0)
            snapshots[str(trainer.save())] = {"step": trainer.step, "seconds": now - start}
        if now - last_report >= PROGRESS_EVERY_S:
            curve.append((trainer.step, float(np.mean(losses[-100:]))))
            print(f"  ours step {trainer.step}/{steps} loss {curve[-1][1]:.4f} ({(now - start) / 60:.1f} min)",
                  flush=True)
            last_report = now
        if now >= deadline:
            break
    seconds = time.perf_counter() - start
    snapshots[str(trainer.save())] = {"step": trainer.step, "seconds": seconds}
    return {"steps": trainer.step, "planned_steps": steps, "seconds": seconds,
            "images_per_second": trainer.step * batch / seconds, "final_loss": float(np.mean(losses[-100:])),
            "loss_curve": curve, "snapshots": snapshots, "parameters": count_parameters(trainer.model),
            "recipe": train.model_dump(mode="json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall clock for each side")
    parser.add_argument("--curve", type=float, nargs="*", default=[5.0, 10.0], help="snapshot minutes before the end")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist", type=Path, default=MNIST_FULL_DIR, help="folder with the four MNIST .gz files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist_full"))
    parser.add_argument("--cache", type=Path, default=None, help="reference statistics cache (default: --out/cache)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in --out (not the cache)")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import DDIMScheduler, DDPMScheduler

    dataset = prepare(args.out, args.mnist)
    train_images, _ = dataset.split("train")
    recipe = pipeline_recipe("mnist")
    print(machine())
    print(f"MNIST {len(train_images)} train / {len(dataset.holdout_indices)} test, 32x32 (padded), tiny-32, "
          f"batch {recipe.train.batch_size}, seed {args.seed}, {args.minutes:g} min each")

    print("training diffusers ...", flush=True)
    theirs = cached_json(args.out / "diffusers.json", lambda: train_diffusers(
        "tiny-32", train_images, recipe.train.batch_size, args.seed, args.minutes, None, args.out,
        tuple(args.curve)), announce=True)
    print("training ours ...", flush=True)
    ours = cached_json(args.out / "ours.json", lambda: train_ours(
        train_images, args.seed, args.minutes, args.curve, args.out), announce=True)

    print("reference statistics (Inception on the 10,000 test images: cached after the first run) ...", flush=True)
    scorers = make_scorer(dataset, args.cache or args.out / "cache", inception=True)
    floors = cached_json(args.out / f"floors-{args.samples}.json", lambda: scorers.floors(args.samples))

    linear = DiffusionConfig(schedule="linear").make_schedule()   # what DDPMScheduler(beta_schedule="linear") is
    jobs = []   # (who, minutes, steps, sampler name, draw)
    for path, info in theirs["snapshots"].items():
        def draw(path=path):
            unet = diffusers_unet("tiny-32")
            unet.load_state_dict(torch.load(path, weights_only=True))
            return timed_samples(DiffusersEpsModel(unet).eval(), SAMPLER.build(linear), args.samples, args.seed)
        jobs.append(("diffusers", info["seconds"] / 60, info["step"], SAMPLER.describe(), draw))
    for path, info in ours["snapshots"].items():
        def draw(path=path):
            model, diffusion, _ = load_model(path)
            sampler = SAMPLER.build(diffusion.make_schedule(), diffusion.prediction_type)
            return timed_samples(model, sampler, args.samples, args.seed)
        jobs.append(("ours", info["seconds"] / 60, info["step"], SAMPLER.describe(), draw))

    def diffusers_own():
        unet = diffusers_unet("tiny-32")
        unet.load_state_dict(torch.load(theirs["checkpoint"], weights_only=True))
        ddim = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config)
        return diffusers_samples(unet, ddim, 50, args.samples, args.seed)
    jobs.append(("diffusers", theirs["seconds"] / 60, theirs["steps"], "diffusers DDIM-50", diffusers_own))

    rows = []
    for who, minutes, steps, sampler_name, draw in jobs:
        stem = f"{who}-{minutes:.1f}min-{sampler_name.replace(' ', '_')}-{args.samples}"

        def score(draw=draw, stem=stem):
            images, seconds = draw()
            np.savez(args.out / f"{stem}.npz", images=images.numpy())
            save_grid(images[:64], args.out / f"{stem}.png", nrow=8, scale=2)
            return {**scorers.fids(images), "seconds_per_image": seconds}
        print(f"sampling and scoring {stem} ...", flush=True)
        rows.append({"model": who, "minutes": minutes, "steps": steps, "sampler": sampler_name,
                     **cached_json(args.out / f"{stem}.json", score, announce=True)})

    print(f"\nMNIST 32x32, FID at {args.samples} samples against the 10,000 test images; "
          f"floors (real train images): fid_inception {floors['fid_inception']:.2f}, "
          f"fid_classifier {floors['fid_classifier']:.2f}; classifier accuracy {scorers.classifier_accuracy:.4f}")
    print(f"{'model':<11}{'minutes':>8}{'steps':>7}{'img/s':>7}  {'sampler':<20}{'fid_inception':>14}"
          f"{'fid_classifier':>15}{'ms/img':>8}")
    for row in sorted(rows, key=lambda r: (r["minutes"], r["model"])):
        speed = theirs if row["model"] == "diffusers" else ours
        print(f"{row['model']:<11}{row['minutes']:>8.1f}{row['steps']:>7}{speed['images_per_second']:>7.0f}  "
              f"{row['sampler']:<20}{row['fid_inception']:>14.2f}{row['fid_classifier']:>15.2f}"
              f"{1000 * row['seconds_per_image']:>8.1f}")
    final = {who: next(r for r in rows if r["model"] == who and r["sampler"] == SAMPLER.describe()
                       and r["steps"] == (theirs if who == "diffusers" else ours)["steps"])
             for who in ("ours", "diffusers")}
    for metric in ("fid_inception", "fid_classifier"):
        print(f"ours/diffusers {metric} after {args.minutes:g} min, same sampler: "
              f"{final['ours'][metric] / final['diffusers'][metric]:.2f}x")
    write_json(args.out / "results.json", {
        "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "floors": floors,
        "classifier_accuracy": scorers.classifier_accuracy, "diffusers": theirs, "ours": ours, "rows": rows})


if __name__ == "__main__":
    main()

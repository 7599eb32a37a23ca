"""Quality at equal budget: our recipe against diffusers' unconditional training example on
MNIST 16x16, at the same model size, batch and seed.

1. diffusers: UNet2DModel (the preset's twin, same parameter count) + DDPMScheduler, trained
   as examples/unconditional_image_generation/train_unconditional.py does by default (AdamW lr
   1e-4, betas (0.95, 0.999), weight decay 1e-6, cosine schedule with 500 warm-up steps, grad-norm
   clip 1, EMAModel with warm-up: inv_gamma 1, power 3/4, max 0.9999), for --minutes of wall
   clock. Its cosine schedule spans --diffusers-epochs (the example's default is 100); "auto"
   sizes it to end with the budget, from the speed of 50 probe steps, so the baseline gets a
   finished schedule in the same minutes. It reaches N steps.
2. ours: the pipeline's default recipe (tasks.config.DEFAULTS.train) at the same batch,
   for the same minutes (budget b), snapshotting the EMA weights at step N (budget a; our
   learning rate is constant after warm-up, so the snapshot at N is exactly an N-step run).
3. 500 samples of each with DDPM-1000 and DDIM-100 (diffusers: its schedulers' defaults; ours:
   our samplers' defaults), fid_classifier against the holdout split, the real-vs-real floor at
   the same count, and 8x8 grids.

    python benchmarks/quality_budget.py [--minutes 20] [--model tiny-16] [--batch 64]

Each phase saves its result under --out and is skipped when rerun (--fresh to redo all).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    make_scorer, cached_json, diffusers_samples, diffusers_unet, machine, prepare_mnist, timed_samples, train_diffusers,
    write_json,
)

from ddpm.data import BatchLoader
from ddpm.images import save_grid
from ddpm.samplers import SamplerConfig
from ddpm.checkpoint import load_model
from ddpm.training import Trainer
from ddpm.unet import count_parameters, preset
from tasks.config import DEFAULTS

PROGRESS_EVERY_S = 60


def train_ours(model_name: str, images_uint8: torch.Tensor, batch: int, seed: int, minutes: float,
               snapshot_step: int, out: Path):
    """Our Trainer with the pipeline's default recipe; checkpoints at step `snapshot_step` (budget a)
    and when `minutes` have passed (budget b).

    A constant learning rate trains on until both are reached. A decaying one is an N-step run
    (its schedule must end at N for budget a); if it finishes inside the minutes, the same
    weights stand for budget b, else b is the checkpoint at the deadline.
    """
    decays = DEFAULTS.train.lr_schedule != "constant"
    recipe = DEFAULTS.train.model_copy(update={"steps": snapshot_step if decays else 10**7, "batch_size": batch,
                                              "seed": seed, "device": "cpu", "keep_last": 10})
    loader = BatchLoader(images_uint8, batch, seed=seed)
    shutil.rmtree(out / "ours", ignore_errors=True)   # a crashed earlier attempt: start clean
    trainer = Trainer(preset(model_name), DEFAULTS.diffusion, recipe, loader.batch, checkpoint_dir=out / "ours")
    losses, curve, checkpoints = [], [], {}
    start = last_report = time.perf_counter()
    deadline = start + 60 * minutes
    seconds = steps_b = None
    while trainer.step < recipe.steps and (seconds is None or trainer.step < snapshot_step):
        losses.append(trainer.train_step()[0])
        now = time.perf_counter()
        if trainer.step == snapshot_step:
            checkpoints["a"] = str(trainer.save())
        if seconds is None and now >= deadline:
            seconds, steps_b = now - start, trainer.step
            checkpoints["b"] = str(trainer.save())
        if now - last_report >= PROGRESS_EVERY_S:
            curve.append((trainer.step, float(np.mean(losses[-100:]))))
            print(f"  ours step {trainer.step} loss {curve[-1][1]:.4f} ({(now - start) / 60:.1f} min)", flush=True)
            last_report = now
    if seconds is None:   # the N-step run ended inside the budget
        seconds, steps_b, checkpoints["b"] = time.perf_counter() - start, trainer.step, checkpoints["a"]
    return {"steps": steps_b, "seconds": seconds, "images_per_second": steps_b * batch / seconds,
            "final_loss": float(np.mean(losses[-100:])), "loss_curve": curve, "checkpoints": checkpoints,
            "parameters": count_parameters(trainer.model), "recipe": recipe.model_dump(mode="json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall clock for each side")
    parser.add_argument("--model", default="tiny-16", help="UNet preset (its diffusers twin is in common.py)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diffusers-epochs", default="auto",
                        help="epochs of diffusers' cosine schedule: a number, or auto (end with the budget)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_budget"))
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import DDIMScheduler, DDPMScheduler

    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    train_images, _ = dataset.split("train")
    scorer = make_scorer(dataset, args.out / "cache")
    print(machine())
    print(f"MNIST 16x16 {len(train_images)} train / {len(dataset.holdout_indices)} holdout, {args.model}, "
          f"batch {args.batch}, seed {args.seed}, {args.minutes:g} min each")

    print("training diffusers ...", flush=True)
    theirs = cached_json(args.out / "diffusers.json", lambda: train_diffusers(
        args.model, train_images, args.batch, args.seed, args.minutes,
        None if args.diffusers_epochs == "auto" else int(args.diffusers_epochs), args.out), announce=True)
    print("training ours ...", flush=True)
    ours = cached_json(args.out / "ours.json", lambda: train_ours(
        args.model, train_images, args.batch, args.seed, args.minutes, theirs["steps"], args.out), announce=True)

    unet = diffusers_unet(args.model)
    unet.load_state_dict(torch.load(args.out / "diffusers-ema.pt", weights_only=True))
    ddpm_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    samplers = {
        "diffusers": {
            "DDPM-1000": lambda: diffusers_samples(unet, ddpm_scheduler, 1000, args.samples, args.seed),
            "DDIM-100": lambda: diffusers_samples(unet, DDIMScheduler.from_config(ddpm_scheduler.config), 100,
                                                  args.samples, args.seed),
        },
    }
    # an N-step run that ended inside the minutes stands for both budgets: sample it once
    budgets = ("a",) if ours["checkpoints"]["a"] == ours["checkpoints"]["b"] else ("a", "b")
    for budget in budgets:
        model, diffusion, _ = load_model(ours["checkpoints"][budget])
        schedule = diffusion.make_schedule()
        samplers[f"ours-{budget}"] = {
            "DDPM-1000": lambda m=model, s=schedule: timed_samples(
                m, SamplerConfig(sampler="ddpm", num_steps=None).build(s), args.samples, args.seed),
            "DDIM-100": lambda m=model, s=schedule: timed_samples(
                m, SamplerConfig(sampler="ddim", num_steps=100, eta=0.0).build(s), args.samples, args.seed),
        }

    floor = scorer.floor(args.samples)
    rows = []
    for who, by_sampler in samplers.items():
        for sampler_name, draw in by_sampler.items():
            def score(draw=draw, who=who, sampler_name=sampler_name):
                images, seconds = draw()
                stem = f"{who}-{sampler_name}"
                np.savez(args.out / f"{stem}.npz", images=images.numpy())
                save_grid(images[:64], args.out / f"{stem}.png", nrow=8, scale=4)
                return {"fid": scorer.fid(images), "seconds_per_image": seconds}
            print(f"sampling {who} {sampler_name} ...", flush=True)
            rows.append({"model": who, "sampler": sampler_name,
                         **cached_json(args.out / f"{who}-{sampler_name}.json", score, announce=True)})

    steps = {"diffusers": theirs["steps"], "ours-a": theirs["steps"], "ours-b": ours["steps"]}
    print(f"\nfid_classifier at {args.samples} samples; real-vs-real floor {floor:.2f}")
    print(f"{'model':<11}{'budget':<22}{'train steps':>12}{'img/s':>8}{'sampler':>11}{'FID':>9}{'ms/img':>9}")
    budget_names = {"diffusers": f"{args.minutes:g} min",
                    "ours-a": "(a) same steps" if len(budgets) == 2 else "(a) and (b)",
                    "ours-b": f"(b) {args.minutes:g} min"}
    for row in rows:
        speed = theirs if row["model"] == "diffusers" else ours
        print(f"{row['model']:<11}{budget_names[row['model']]:<22}{steps[row['model']]:>12}"
              f"{speed['images_per_second']:>8.0f}{row['sampler']:>11}{row['fid']:>9.2f}"
              f"{1000 * row['seconds_per_image']:>9.2f}")
    fid = {(r["model"], r["sampler"]): r["fid"] for r in rows}
    for sampler_name in ("DDPM-1000", "DDIM-100"):
        for budget in ("a", "b"):
            ours_key = f"ours-{budget}" if budget in budgets else "ours-a"
            ratio = fid[(ours_key, sampler_name)] / fid[("diffusers", sampler_name)]
            print(f"ours/diffusers FID, {sampler_name}, budget ({budget}): {ratio:.2f}x")
    write_json(args.out / "results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                           "floor": floor, "classifier_accuracy": scorer.classifier_accuracy,
                                           "diffusers": theirs, "ours": ours, "rows": rows})


if __name__ == "__main__":
    main()

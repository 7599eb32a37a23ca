"""Tune the small-model recipe by measurement: train each candidate for the same wall-clock
minutes on MNIST 16x16, then score fid_classifier (500 samples, the default sampler) for several
EMA decays of the same run (extra EMA copies cost nothing measurable at this size).

    python benchmarks/recipe_sweep.py [--minutes 4] [--model tiny-16] \
        [--recipe lr=1e-3,batch=64 lr=2e-3,batch=64,schedule=cosine ...]

A recipe is comma-separated key=value: lr, batch, warmup, schedule (noise), dropout, decay (the
learning rate after warm-up: constant, or cosine to 0 at the step count 50 probe steps predict
for the budget), minsnr (Min-SNR-gamma loss weighting with that gamma; 0: none).
The Min-SNR comparison of docs/benchmarks.md: --recipe lr=4e-3,schedule=cosine,decay=cosine
lr=4e-3,schedule=cosine,decay=cosine,minsnr=5 --sampler default. The table and a JSON
record go to --out (default benchmarks/results/recipe_sweep).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from torch.optim.swa_utils import AveragedModel

from common import make_scorer, machine, prepare_mnist, timed_samples, write_json

from ddpm.data import BatchLoader
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import Trainer, TrainConfig, ema_multi_avg_fn
from ddpm.unet import preset

DEFAULT_RECIPES = [   # the sweep of docs/benchmarks.md, in the order it was run
    "lr=5e-4,batch=64", "lr=1e-3,batch=64", "lr=2e-3,batch=64", "lr=2e-3,batch=128",
    "lr=2e-3,batch=64,schedule=cosine", "lr=4e-3,schedule=cosine", "lr=2e-3,schedule=cosine,decay=cosine",
    "lr=4e-3,schedule=cosine,decay=cosine",
]
EMA_DECAYS = (0.99, 0.995, 0.999)   # with the warm-up (1+n)/(10+n), a short run never reaches more
# DDIM-100 eta 0, the default sampler when the sweep ran
SAMPLER = SamplerConfig(sampler="ddim", num_steps=100, eta=0.0)


def parse_recipe(text: str) -> dict:
    recipe = {"lr": 1e-3, "batch": 64, "warmup": 100, "schedule": "linear", "dropout": None, "decay": "constant",
              "minsnr": 0.0}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in recipe:
            raise SystemExit(f"unknown recipe key {key!r} in {text!r}; use {sorted(recipe)}")
        if key in ("schedule", "decay"):
            recipe[key] = value
        else:
            recipe[key] = float(value) if key in ("lr", "dropout", "minsnr") else int(value)
    return recipe


def train_for(recipe: dict, model_name: str, images, minutes: float, seed: int):
    """Train until the wall clock runs out; returns (trainer, EMA models by decay, mean loss of the
    last 100 steps, training minutes)."""
    overrides = {} if recipe["dropout"] is None else {"dropout": recipe["dropout"]}
    train = TrainConfig(steps=10**7, batch_size=recipe["batch"], learning_rate=recipe["lr"],
                        warmup_steps=recipe["warmup"], ema_decay=EMA_DECAYS[0], seed=seed, device="cpu",
                        lr_schedule=recipe["decay"])
    loader = BatchLoader(images, recipe["batch"], seed=seed)

    def new_trainer(config):
        diffusion = DiffusionConfig(schedule=recipe["schedule"], min_snr_gamma=recipe["minsnr"] or None)
        return Trainer(preset(model_name, **overrides), diffusion, config, loader.batch)

    if recipe["decay"] != "constant":   # a decay needs the step count: predict it from 50 probe steps
        probe, start = new_trainer(train), time.perf_counter()
        for _ in range(50):
            probe.train_step()
        train = train.model_copy(update={"steps": round(60 * minutes * 50 / (time.perf_counter() - start))})
    trainer = new_trainer(train)
    emas = {d: AveragedModel(trainer.model, multi_avg_fn=ema_multi_avg_fn(d, True), use_buffers=True)
            for d in EMA_DECAYS}
    losses = []
    start = time.perf_counter()
    deadline = start + 60 * minutes
    # a decaying rate runs its predicted steps to the end (a schedule cut short would be unfair to it)
    while trainer.step < train.steps and (recipe["decay"] != "constant" or time.perf_counter() < deadline):
        losses.append(trainer.train_step()[0])
        for ema in emas.values():
            ema.update_parameters(trainer.model)
    return trainer, emas, sum(losses[-100:]) / len(losses[-100:]), (time.perf_counter() - start) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall clock per recipe")
    parser.add_argument("--model", default="tiny-16")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=["ddim100", "default"], default="ddim100",
                        help="ddim100: DDIM-100 eta 0 (the sweep's original); default: SamplerConfig()")
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recipe_sweep"))
    args = parser.parse_args()
    sampler_config = SAMPLER if args.sampler == "ddim100" else SamplerConfig()

    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    scorer = make_scorer(dataset, args.out / "cache")
    train_images, _ = dataset.split("train")
    floor = scorer.floor(args.samples)
    print(f"{machine()}\nMNIST 16x16: {len(train_images)} train images; fid_classifier floor at "
          f"{args.samples} samples = {floor:.2f}; sampler {sampler_config.describe()}; {args.minutes:g} min per recipe")
    print(f"{'recipe':<40}{'min':>6}{'steps':>7}{'final loss':>12}"
          + "".join(f"{'EMA ' + str(d):>12}" for d in EMA_DECAYS))
    rows = []
    for text in args.recipe:
        recipe = parse_recipe(text)
        trainer, emas, loss, trained_minutes = train_for(recipe, args.model, train_images, args.minutes, args.seed)
        steps = trainer.step
        sampler = sampler_config.build(trainer.schedule)
        scores = {}
        for decay, ema in emas.items():
            model = copy.deepcopy(ema.module).eval()
            images, _ = timed_samples(model, sampler, args.samples, seed=args.seed)
            scores[decay] = scorer.fid(images)
        rows.append({"recipe": text, **recipe, "minutes": trained_minutes, "steps": steps, "loss": loss,
                     "fid": scores})
        print(f"{text:<40}{trained_minutes:>6.1f}{steps:>7}{loss:>12.4f}"
              + "".join(f"{scores[d]:>12.2f}" for d in EMA_DECAYS), flush=True)
    write_json(args.out / "results.json", {"machine": machine(), "minutes": args.minutes, "model": args.model,
                                           "floor": floor, "samples": args.samples, "rows": rows})


if __name__ == "__main__":
    main()

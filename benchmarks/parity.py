"""The speed switches against fp32 eager on this machine: training speed and FID at equal steps.

The same model, recipe (the pipeline's), data order and seed trained once in fp32 eager and once
with each switch asked for, for each training seed:
- bf16: `train.mixed_precision="bf16"` (weights, Adam and EMA stay fp32; convolutions and
  matmuls run in bf16);
- compile: `train.compile=true` (torch.compile, inductor; fp32).
Each model is sampled in fp32 eager with the default sampler and scored with fid_classifier
against the holdout (--samples images x sampling seeds 0 and 1). A switch passes when its FID is
within the seed-to-seed spread of fp32's (the bar for making it a default). The first step is a
warm-up, not timed: it compiles, and oneDNN picks its kernels; its time is printed.

    python benchmarks/parity.py [--preset small-16] [--variants bf16 compile] [--steps 800]
                                [--train-seeds 0 1] [--samples 500]

Data: MNIST 16x16 (the t10k split in ../shared, seeded 8000/2000 split), as the other benchmarks.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import make_scorer, cached_json, machine, prepare_mnist, write_json

from ddpm.checkpoint import load_model
from ddpm.data import BatchLoader
from ddpm.images import to_uint8
from ddpm.samplers import SamplerConfig, generate
from ddpm.training import Trainer
from ddpm.unet import preset
from tasks.config import DEFAULTS

# each variant's TrainConfig settings; fp32 eager is the reference
VARIANTS = {"fp32": {"mixed_precision": "no"}, "bf16": {"mixed_precision": "bf16"},
            "compile": {"mixed_precision": "no", "compile": True}}


def train(preset_name: str, images: torch.Tensor, steps: int, seed: int, variant: str, out: Path) -> dict:
    config = DEFAULTS.train.model_copy(update={"steps": steps, "seed": seed, "device": "cpu", **VARIANTS[variant],
                                               "checkpoint_every": 10**9, "log_every": 10**9})
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(preset(preset_name), DEFAULTS.diffusion, config,
                      BatchLoader(images, config.batch_size, seed=seed).batch, checkpoint_dir=out)
    start = time.perf_counter()
    trainer.train_step()   # warm-up, not timed: compilation, oneDNN's kernel choice
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    result = trainer.train(progress=False)
    seconds = time.perf_counter() - start
    return {"steps": result.step, "checkpoint": str(result.checkpoints[-1]), "final_loss": result.final_loss,
            "ms_per_image": 1000 * seconds / ((result.step - 1) * config.batch_size), "warm_up_seconds": warm_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-16", choices=["tiny-16", "small-16"])
    parser.add_argument("--variants", nargs="+", default=["bf16"], choices=[v for v in VARIANTS if v != "fp32"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity"))
    args = parser.parse_args()
    out = args.out / f"{args.preset}-{args.steps}"
    out.mkdir(parents=True, exist_ok=True)
    print(machine())
    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    images, _ = dataset.split("train")
    scorer = make_scorer(dataset, args.out / "cache")
    sampling = SamplerConfig(num_images=args.samples, batch_size=250)

    rows = []
    for seed in args.train_seeds:
        for variant in ["fp32", *args.variants]:
            name = f"{variant}-seed{seed}"
            trained = cached_json(out / f"{name}.json", lambda: train(args.preset, images, args.steps, seed, variant,
                                                                       out / name), announce=True)
            model, diffusion, _ = load_model(trained["checkpoint"])
            sampler = sampling.build(diffusion.make_schedule(), diffusion.prediction_type)
            fids = [cached_json(out / f"{name}-fid{s}-{args.samples}.json",
                                lambda s=s: {"fid": scorer.fid(to_uint8(generate(model, sampler, args.samples, seed=s,
                                                                                  batch_size=250)))})["fid"]
                    for s in (0, 1)]
            rows.append({"seed": seed, "variant": variant, "ms_per_image": trained["ms_per_image"],
                         "warm_up_seconds": trained.get("warm_up_seconds", float("nan")),
                         "final_loss": trained["final_loss"], "fid": float(np.mean(fids))})

    print(f"\n{args.preset}, {args.steps} steps of the pipeline's recipe (batch {DEFAULTS.train.batch_size}), "
          f"fid_classifier at {args.samples} samples (mean of 2 sampling seeds), floor {scorer.floor(args.samples):.2f}")
    print(f"{'train seed':<12}{'variant':<10}{'ms/img':>8}{'warm-up s':>11}{'final loss':>12}{'fid':>9}")
    for row in rows:
        print(f"{row['seed']:<12}{row['variant']:<10}{row['ms_per_image']:>8.2f}{row['warm_up_seconds']:>11.1f}"
              f"{row['final_loss']:>12.4f}{row['fid']:>9.2f}")
    by = {v: [r for r in rows if r["variant"] == v] for v in ["fp32", *args.variants]}
    fid32 = np.mean([r["fid"] for r in by["fp32"]])
    spread = float(np.ptp([r["fid"] for r in by["fp32"]])) if len(by["fp32"]) > 1 else float("nan")
    summary = {"fid_fp32": fid32, "fp32_spread": spread}
    for variant in args.variants:
        speed = np.mean([r["ms_per_image"] for r in by["fp32"]]) / np.mean([r["ms_per_image"] for r in by[variant]])
        fid = np.mean([r["fid"] for r in by[variant]])
        verdict = "within" if abs(fid - fid32) <= spread else "OUTSIDE"
        print(f"{variant} trains {speed:.2f}x as fast as fp32 eager; FID {fid:.2f} vs {fid32:.2f} (difference "
              f"{fid - fid32:+.2f}, {verdict} fp32's seed-to-seed spread {spread:.2f})")
        summary[variant] = {"speedup": speed, "fid": fid}
    write_json(out / "results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                      "rows": rows, **summary})


if __name__ == "__main__":
    main()

"""bf16 autocast against fp32 on this CPU: training speed and FID at equal steps.

The same model, recipe (the pipeline's), data order and seed trained twice, once in fp32 and once
with `train.mixed_precision="bf16"` (weights, Adam and EMA stay fp32; convolutions and matmuls
run in bf16), for each training seed. Each model is sampled in fp32 with the default sampler and
scored with fid_classifier against the holdout (--samples images x sampling seeds 0 and 1). bf16
passes when its FID is within the seed-to-seed spread of fp32's (the issue's bar for making it a
default).

    python benchmarks/precision.py [--preset small-16] [--steps 800] [--train-seeds 0 1] [--samples 500]

Data: MNIST 16x16 (the t10k split in ../shared, seeded 8000/2000 split), as the other benchmarks.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import Scorer, cached_json, machine, prepare_mnist, write_json

from ddpm.checkpoint import load_model
from ddpm.data import BatchLoader
from ddpm.images import to_uint8
from ddpm.samplers import SamplerConfig, generate
from ddpm.training import Trainer
from ddpm.unet import preset
from tasks.config import DEFAULTS

PRECISIONS = ("no", "bf16")   # TrainConfig.mixed_precision: "no" is fp32


def train(preset_name: str, images: torch.Tensor, steps: int, seed: int, precision: str, out: Path) -> dict:
    config = DEFAULTS.train.model_copy(update={"steps": steps, "seed": seed, "device": "cpu", "mixed_precision": precision,
                                               "checkpoint_every": 10**9, "log_every": 10**9})
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(preset(preset_name), DEFAULTS.diffusion, config,
                      BatchLoader(images, config.batch_size, seed=seed).batch, checkpoint_dir=out)
    trainer.train_step()   # warm-up, not timed (oneDNN picks its kernels on the first call)
    start = time.perf_counter()
    result = trainer.train(progress=False)
    seconds = time.perf_counter() - start
    return {"steps": result.step, "checkpoint": str(result.checkpoints[-1]), "final_loss": result.final_loss,
            "ms_per_image": 1000 * seconds / ((result.step - 1) * config.batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-16", choices=["tiny-16", "small-16"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision"))
    args = parser.parse_args()
    out = args.out / f"{args.preset}-{args.steps}"
    out.mkdir(parents=True, exist_ok=True)
    print(machine())
    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    images, _ = dataset.split("train")
    scorer = Scorer(dataset, args.out / "cache")
    sampling = SamplerConfig(num_images=args.samples, batch_size=250)

    rows = []
    for seed in args.train_seeds:
        for precision in PRECISIONS:
            name = f"{precision}-seed{seed}"
            trained = cached_json(out / f"{name}.json", lambda: train(args.preset, images, args.steps, seed, precision,
                                                                       out / name), announce=True)
            model, diffusion, _ = load_model(trained["checkpoint"])
            sampler = sampling.build(diffusion.make_schedule(), diffusion.prediction_type)
            fids = [cached_json(out / f"{name}-fid{s}-{args.samples}.json",
                                lambda s=s: {"fid": scorer.fid(to_uint8(generate(model, sampler, args.samples, seed=s,
                                                                                  batch_size=250)))})["fid"]
                    for s in (0, 1)]
            rows.append({"seed": seed, "precision": "fp32" if precision == "no" else precision,
                         "ms_per_image": trained["ms_per_image"], "final_loss": trained["final_loss"],
                         "fid": float(np.mean(fids))})

    print(f"\n{args.preset}, {args.steps} steps of the pipeline's recipe (batch {DEFAULTS.train.batch_size}), "
          f"fid_classifier at {args.samples} samples (mean of 2 sampling seeds), floor {scorer.floor(args.samples):.2f}")
    print(f"{'train seed':<12}{'precision':<11}{'ms/img':>8}{'final loss':>12}{'fid':>9}")
    for row in rows:
        print(f"{row['seed']:<12}{row['precision']:<11}{row['ms_per_image']:>8.2f}{row['final_loss']:>12.4f}"
              f"{row['fid']:>9.2f}")
    by = {p: [r for r in rows if r["precision"] == p] for p in ("fp32", "bf16")}
    speed = np.mean([r["ms_per_image"] for r in by["fp32"]]) / np.mean([r["ms_per_image"] for r in by["bf16"]])
    fid32, fid16 = (np.mean([r["fid"] for r in by[p]]) for p in ("fp32", "bf16"))
    spread = float(np.ptp([r["fid"] for r in by["fp32"]])) if len(by["fp32"]) > 1 else float("nan")
    verdict = "within" if abs(fid16 - fid32) <= spread else "OUTSIDE"
    print(f"\nbf16 trains {speed:.2f}x as fast; FID {fid16:.2f} vs fp32 {fid32:.2f} (difference {fid16 - fid32:+.2f}, "
          f"{verdict} fp32's seed-to-seed spread {spread:.2f})")
    write_json(out / "results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                      "rows": rows, "speedup": speed, "fid_fp32": fid32, "fid_bf16": fid16,
                                      "fp32_spread": spread})


if __name__ == "__main__":
    main()

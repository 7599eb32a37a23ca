"""Post-hoc EMA (EDM2) against the fixed EMA decay, on full-size MNIST with the standard metric.

Data and model as benchmarks/mnist_full.py: the `mnist` recipe (tiny-32, cosine schedule, lr 4e-3
with cosine decay, EMA 0.999), the 60,000 train images, FID against the 10,000 test images.

For each training seed, one training run of --minutes with train.posthoc_ema on (EDM2's widths
0.05 and 0.10, 20 snapshots): the run's own fixed-decay EMA and the post-hoc reconstructions come
from the same training, so the comparison is at equal training minutes by construction. Then:

- the fixed EMA (0.999) and each width of the sweep, reconstructed at the last step, sampled with
  the same sampler and seed (--samples images) and scored with fid_inception and fid_classifier,
  beside each metric's real-vs-real floor;
- the measurement's own spread: the fixed EMA and the best width sampled again on --spread-seeds
  other seeds (a difference inside that spread is a tie);
- the cost: seconds per step with and without tracking the two EMAs (interleaved probes), disk per
  snapshot, and the minutes one width takes to evaluate (reconstruct, sample, score).

    python benchmarks/posthoc_ema.py [--minutes 6] [--seeds 0 1] [--samples 500] [--cache DIR]

Each phase saves its result under --out and is skipped when rerun. The Inception statistics of the
10,000 reference images (~25 min on 2 cores) are cached in --cache (share it with mnist_full.py).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import cached_json, machine, make_scorer, timed_samples, write_json
from mnist_full import MNIST_FULL_DIR, prepare

from ddpm.checkpoint import list_checkpoints, load_model
from ddpm.data import BatchLoader
from ddpm.posthoc_ema import fixed_ema_sigma_rel, list_snapshots, posthoc_checkpoint
from ddpm.samplers import SamplerConfig
from ddpm.training import Trainer
from tasks.config import DEFAULTS, recipe as pipeline_recipe
from tasks.posthoc import DEFAULT_SIGMA_RELS

SAMPLER = SamplerConfig()   # the pipeline's default sampler (DPM-Solver++ 2M SDE, 20 steps)
PROGRESS_EVERY_S = 60


def seconds_per_step(images: torch.Tensor, posthoc: bool, steps: int = 20) -> float:
    recipe = pipeline_recipe("mnist")
    train = recipe.train.model_copy(update={"device": "cpu", "posthoc_ema": posthoc})
    trainer = Trainer(recipe.model, DEFAULTS.diffusion, train, BatchLoader(images, train.batch_size, seed=0).batch)
    trainer.train_step()   # one-off allocation costs
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def tracking_cost(images: torch.Tensor, rounds: int = 3) -> dict:
    """Seconds per step without and with the two post-hoc EMAs, interleaved so that drift in the
    machine's speed hits both alike (medians over `rounds`)."""
    off, on = [], []
    for _ in range(rounds):
        off.append(seconds_per_step(images, False))
        on.append(seconds_per_step(images, True))
    return {"seconds_per_step_fixed_only": float(np.median(off)), "seconds_per_step_posthoc": float(np.median(on)),
            "overhead": float(np.median(on) / np.median(off) - 1)}


def train(images: torch.Tensor, seed: int, minutes: float, seconds_per_step: float, out: Path) -> dict:
    """The `mnist` recipe for `minutes` (steps sized from the probe so the cosine decay ends with
    the budget; cut at the deadline all the same) with post-hoc EMA snapshots."""
    recipe = pipeline_recipe("mnist")
    steps = int(60 * minutes / seconds_per_step)
    config = recipe.train.model_copy(update={"steps": steps, "seed": seed, "device": "cpu", "posthoc_ema": True,
                                             "checkpoint_every": steps, "keep_last": 1})
    folder = out / f"seed-{seed}"
    shutil.rmtree(folder, ignore_errors=True)   # a crashed earlier attempt: start clean
    trainer = Trainer(recipe.model, DEFAULTS.diffusion, config, BatchLoader(images, config.batch_size, seed=seed).batch,
                      checkpoint_dir=folder)
    start = time.perf_counter()
    last = [start]

    def on_log(step, metrics):
        if time.perf_counter() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.perf_counter()
            print(f"  seed {seed} step {step}/{steps} loss {metrics['loss']:.4f} "
                  f"({(last[0] - start) / 60:.1f} min)", flush=True)
    result = trainer.train(on_log=on_log, progress=False)
    snapshots = list_snapshots(folder)
    return {"steps": result.step, "seconds": time.perf_counter() - start, "final_loss": result.final_loss,
            "checkpoint": str(list_checkpoints(folder)[-1]), "checkpoint_dir": str(folder),
            "snapshots": len(snapshots), "snapshot_bytes": snapshots[-1].stat().st_size,
            "fixed_sigma_rel": fixed_ema_sigma_rel(config.ema_decay, result.step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0, help="training wall clock per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=list(DEFAULT_SIGMA_RELS))
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--spread-seeds", type=int, default=2, help="extra sampling seeds for the fixed and best")
    parser.add_argument("--mnist", type=Path, default=MNIST_FULL_DIR)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/posthoc_ema"))
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/mnist_full/cache"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = prepare(args.out, args.mnist)
    images, _ = dataset.split("train")
    print(machine())
    print(f"MNIST {len(images)} train / {len(dataset.holdout_indices)} test, 32x32, tiny-32, `mnist` recipe, "
          f"{args.minutes:g} min per seed, seeds {args.seeds}, {args.samples} samples, {SAMPLER.describe()}")
    cost = cached_json(args.out / "cost.json", lambda: tracking_cost(images), announce=True)
    print(f"seconds/step: fixed EMA only {cost['seconds_per_step_fixed_only']:.3f}, with post-hoc EMA "
          f"{cost['seconds_per_step_posthoc']:.3f} ({100 * cost['overhead']:+.1f}%)")
    runs = {seed: cached_json(args.out / f"train-{seed}.json", lambda seed=seed: train(
        images, seed, args.minutes, cost["seconds_per_step_posthoc"], args.out), announce=True) for seed in args.seeds}

    print("reference statistics (cached after the first run) ...", flush=True)
    scorer = make_scorer(dataset, args.cache, inception=True)
    floors = cached_json(args.out / f"floors-{args.samples}.json", lambda: scorer.floors(args.samples))

    def score(checkpoint: str, sampling_seed: int) -> dict:
        start = time.perf_counter()
        model, diffusion, _ = load_model(checkpoint)
        sampler = SAMPLER.build(diffusion.make_schedule(), diffusion.prediction_type)
        images, _ = timed_samples(model, sampler, args.samples, sampling_seed)
        return {**scorer.fids(images), "seconds": time.perf_counter() - start}

    rows = []
    for seed, run in runs.items():
        fixed = cached_json(args.out / f"fixed-{seed}-s0.json", lambda: score(run["checkpoint"], 0), announce=True)
        fixed_name = f"fixed EMA 0.999 (~{fixed_ema_sigma_rel(0.999, run['steps']):.2f})"
        rows.append({"seed": seed, "model": fixed_name, "sigma_rel": None, "sampling_seed": 0, **fixed})
        for sigma_rel in args.sigma_rels:
            def reconstruct_and_score(sigma_rel=sigma_rel, run=run):
                start = time.perf_counter()
                path, info = posthoc_checkpoint(run["checkpoint_dir"], sigma_rel,
                                                args.out / f"seed-{seed}-recon" / f"{sigma_rel:.4f}")
                scored = score(str(path), 0)
                return {**scored, "checkpoint": str(path), "profile_error": info["profile_error"],
                        "seconds": time.perf_counter() - start}
            row = cached_json(args.out / f"posthoc-{seed}-{sigma_rel:.4f}-s0.json", reconstruct_and_score, announce=True)
            rows.append({"seed": seed, "model": f"post-hoc {sigma_rel:g}", "sigma_rel": sigma_rel, "sampling_seed": 0,
                         **row})
        best = min((r for r in rows if r["seed"] == seed and r["sigma_rel"]), key=lambda r: r["fid_inception"])
        for k in range(1, args.spread_seeds + 1):   # the measurement's spread, on other sampling seeds
            for name, checkpoint, file in ((fixed_name, run["checkpoint"], "fixed"),
                                           (best["model"], best["checkpoint"], f"{best['sigma_rel']:.4f}")):
                extra = cached_json(args.out / f"spread-{seed}-{file}-s{k}.json",
                                    lambda c=checkpoint, k=k: score(c, 1000 * k), announce=True)
                rows.append({"seed": seed, "model": name, "sigma_rel": None, "sampling_seed": 1000 * k, **extra})

    print(f"\nfloors at {args.samples} samples (real train images): fid_inception {floors['fid_inception']:.2f}, "
          f"fid_classifier {floors['fid_classifier']:.2f}")
    for seed, run in runs.items():
        print(f"seed {seed}: {run['steps']} steps in {run['seconds'] / 60:.1f} min, {run['snapshots']} snapshots x "
              f"{run['snapshot_bytes'] / 2**20:.2f} MiB = {run['snapshots'] * run['snapshot_bytes'] / 2**20:.1f} MiB")
    print(f"{'seed':>4}  {'model':<28}{'sampling seed':>14}{'fid_inception':>14}{'fid_classifier':>15}{'eval min':>9}")
    for row in rows:
        print(f"{row['seed']:>4}  {row['model']:<28}{row['sampling_seed']:>14}{row['fid_inception']:>14.2f}"
              f"{row['fid_classifier']:>15.2f}{row['seconds'] / 60:>9.2f}")
    for seed in runs:
        mine = [r for r in rows if r["seed"] == seed]
        fixed_model = mine[0]["model"]
        best = min((r for r in mine if r["sigma_rel"]), key=lambda r: r["fid_inception"])
        for metric in ("fid_inception", "fid_classifier"):
            fixed_all = [r[metric] for r in mine if r["model"] == fixed_model]
            best_all = [r[metric] for r in mine if r["model"] == best["model"]]
            print(f"seed {seed} {metric}: fixed {np.mean(fixed_all):.2f} +- {np.std(fixed_all, ddof=1):.2f}, "
                  f"best post-hoc ({best['model']}) {np.mean(best_all):.2f} +- {np.std(best_all, ddof=1):.2f} "
                  f"over {len(fixed_all)} sampling seeds")
    write_json(args.out / "results.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                           "cost": cost, "runs": runs, "floors": floors, "rows": rows})


if __name__ == "__main__":
    main()

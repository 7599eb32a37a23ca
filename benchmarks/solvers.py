"""Few-step solvers: FID and time per image at 5, 10, 15, 20 and 50 network evaluations on the
same weights, ours side by side with diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler driving our network, against DDPM-1000 and the previous default (DDIM-50, eta 1).

Weights: tiny-16 trained on MNIST 16x16 (the t10k split, seeded 8000/2000 split, as the other
benchmarks) with the pipeline's recipe for --minutes (cached in --out). Every row: --samples
images per seed for seeds 0, 1, 2, fid_classifier against the 2000 holdout images; the table
gives the mean over the seeds and the spread. diffusers' schedulers get our trained betas
(`trained_betas`), x0 clipped as ours, and for DPM-Solver++ our start (see `same` below); they call
our UNet through an adapter.

    python benchmarks/solvers.py [--minutes 5] [--samples 500] [--seeds 0 1 2]

It ends with the targets (each solver at 10 NFE against DDPM-1000; ours against diffusers') and
the pick: the cheapest setting (by network evaluations) whose mean FID is within 10% of the best.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from common import (make_scorer, cached_json, diffusers_samples, machine, prepare_mnist, recipe_steps, timed_samples,
                    write_json)

from ddpm.data import BatchLoader
from ddpm.samplers import SamplerConfig
from ddpm.checkpoint import load_model
from ddpm.training import Trainer
from ddpm.unet import preset
from tasks.config import DEFAULTS

STEPS = (5, 10, 15, 20, 50)
OURS = ("dpm++2m", "dpm++2m-sde", "unipc", "heun")


class OursAsDiffusers(torch.nn.Module):
    """Our UNet behind UNet2DModel's call convention (`.sample`, `config.sample_size`)."""

    class Output:
        def __init__(self, sample):
            self.sample = sample

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = type("Config", (), {"in_channels": model.config.in_channels,
                                          "sample_size": model.config.image_size})

    def forward(self, x, t):
        return self.Output(self.model(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0])))


def train(images_uint8: torch.Tensor, minutes: float, out: Path) -> dict:
    """The pipeline's recipe on tiny-16, its cosine learning-rate decay sized to end with the budget."""
    batch = DEFAULTS.train.batch_size
    steps = recipe_steps(images_uint8, minutes)
    config = DEFAULTS.train.model_copy(update={"steps": steps, "device": "cpu", "checkpoint_every": 10**9})
    shutil.rmtree(out / "weights", ignore_errors=True)
    trainer = Trainer(preset("tiny-16"), DEFAULTS.diffusion, config, BatchLoader(images_uint8, batch, seed=0).batch,
                      checkpoint_dir=out / "weights")
    result = trainer.train()
    return {"steps": result.step, "checkpoint": str(result.checkpoints[-1]), "final_loss": result.final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of the weights")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/solvers"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    train_images, _ = dataset.split("train")
    scorer = make_scorer(dataset, args.out / "cache")
    print(machine())
    weights = cached_json(args.out / "weights.json", lambda: train(train_images, args.minutes, args.out), announce=True)
    model, diffusion, _ = load_model(weights["checkpoint"])
    schedule = diffusion.make_schedule()
    floor = scorer.floor(args.samples)
    print(f"tiny-16 on MNIST 16x16, {weights['steps']} steps ({args.minutes:g} min); fid_classifier at "
          f"{args.samples} samples, floor {floor:.2f}; mean over seeds {args.seeds}")

    betas = schedule.betas.double().numpy()
    # Equal settings: x0 clipped to [-1, 1] as ours (clip_x0; diffusers' thresholding with
    # sample_max_value 1 is that clip), and for DPM-Solver++ the same start (lambda_min_clipped -5.1,
    # diffusers' advice for the cosine schedule; UniPC has no such option). Otherwise diffusers'
    # defaults: 2nd order, linspace timesteps, last step to sigma 0. With its plain defaults,
    # diffusers' DPM-Solver++ diverges on the cosine schedule (alpha_T = 5e-5 amplifies the eps
    # error 2e4x): the "(defaults)" rows.
    same = {"num_train_timesteps": len(betas), "trained_betas": betas, "thresholding": True, "sample_max_value": 1.0}
    diffusers_schedulers = {
        "diffusers dpm++2m": lambda: DPMSolverMultistepScheduler(**same, lambda_min_clipped=-5.1),
        "diffusers dpm++2m-sde": lambda: DPMSolverMultistepScheduler(**same, lambda_min_clipped=-5.1,
                                                                     algorithm_type="sde-dpmsolver++"),
        "diffusers unipc": lambda: UniPCMultistepScheduler(**same),
        "diffusers dpm++2m (defaults)": lambda: DPMSolverMultistepScheduler(num_train_timesteps=len(betas),
                                                                            trained_betas=betas),
    }
    adapter = OursAsDiffusers(model).eval()

    settings = {"DDPM-1000": (SamplerConfig(sampler="ddpm", num_steps=None), 1000),
                "DDIM-50 eta1": (SamplerConfig(sampler="ddim", num_steps=50, eta=1.0), 50)}
    for name in OURS:
        for n in STEPS:
            config = SamplerConfig(sampler=name, num_steps=n)
            settings[f"{name}-{n}"] = (config, config.build(schedule).nfe)
    rows = []
    print(f"\n{'setting':<28}{'NFE':>5}{'FID mean':>10}{'spread':>8}{'ms/img':>9}")

    def scored(draw):
        def run(seed):
            images, seconds = draw(seed)
            return {"fid": scorer.fid(images), "seconds": seconds}
        return run

    for name, (config, nfe) in settings.items():
        sampler = config.build(schedule)
        report_cached(args, rows, name, nfe,
                      scored(lambda seed, s=sampler: timed_samples(model, s, args.samples, seed)))
    for name, make in diffusers_schedulers.items():
        for n in STEPS:
            draw = lambda seed, make=make, n=n: diffusers_samples(adapter, make(), n, args.samples, seed)  # noqa: E731
            report_cached(args, rows, f"{name}-{n}", n, scored(draw))

    reference = next(r for r in rows if r["setting"] == "DDPM-1000")
    default = next(r for r in rows if r["setting"] == "DDIM-50 eta1")
    ours = [r for r in rows if r["setting"].startswith(OURS)]
    close = [r for r in ours if r["fid"] <= 1.1 * reference["fid"]]
    print(f"\nDDPM-1000: {reference['fid']:.2f}; DDIM-50 eta 1: {default['fid']:.2f} "
          f"({1000 * default['seconds_per_image']:.2f} ms/img)")
    for n in (10,):
        for name in OURS:
            r = next(r for r in rows if r["setting"] == f"{name}-{n}")
            print(f"{name}-{n}: FID {r['fid']:.2f} = {r['fid'] / reference['fid']:.2f}x DDPM-1000")
    for name in ("dpm++2m", "dpm++2m-sde", "unipc"):
        for n in STEPS:
            a = next(r for r in rows if r["setting"] == f"{name}-{n}")
            b = next(r for r in rows if r["setting"] == f"diffusers {name}-{n}")
            print(f"{name}-{n}: ours {a['fid']:.2f} vs diffusers {b['fid']:.2f}")
    ours_and_ddim = ours + [default]
    best = min(r["fid"] for r in ours_and_ddim + [reference])
    pick = min((r for r in ours_and_ddim if r["fid"] <= 1.1 * best), key=lambda r: (r["nfe"], r["fid"]))
    print(f"pick: {pick['setting']} (FID {pick['fid']:.2f}, {pick['nfe']} NFE; best {best:.2f}): "
          f"{default['nfe'] / pick['nfe']:.1f}x fewer evaluations than DDIM-50 eta 1 ({default['fid']:.2f}), "
          f"{reference['nfe'] / pick['nfe']:.0f}x fewer than DDPM-1000 ({reference['fid']:.2f}); "
          f"{len(close)} of our settings within 10% of DDPM-1000")
    write_json(args.out / "results.json", {"machine": machine(), "weights": weights, "floor": floor,
                                           "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


def report_cached(args, rows, name: str, nfe: int, run) -> None:
    """One row: `run(seed)` -> {"fid", "seconds"} for each seed (cached per seed), mean and spread."""
    per_seed = [cached_json(args.out / "rows" / f"{name.replace(' ', '_')}-seed{seed}-{args.samples}.json",
                            lambda seed=seed: run(seed)) for seed in args.seeds]
    fids = [r["fid"] for r in per_seed]
    row = {"setting": name, "nfe": nfe, "fids": fids, "fid": float(np.mean(fids)), "spread": float(np.ptp(fids)),
           "seconds_per_image": float(np.mean([r["seconds"] for r in per_seed]))}
    rows.append(row)
    print(f"{name:<28}{nfe:>5}{row['fid']:>10.2f}{row['spread']:>8.2f}{1000 * row['seconds_per_image']:>9.2f}",
          flush=True)


if __name__ == "__main__":
    main()

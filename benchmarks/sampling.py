"""Sampler table: FID and time per image of every sampler setting on the same trained weights.

Ours (the (b) checkpoint of benchmarks/quality_budget.py, or --checkpoint): DDIM at 10, 25, 50,
100 and 250 steps with eta 0 and 1, x0 clipping on and off, the three spacings; DDPM-1000 with
both variances (beta: the paper's sigma^2 = beta_t; beta_tilde: the posterior variance) and
respaced DDPM. Then why diffusers' DDIM-100 scores worse than its DDPM-1000 on the diffusers
model of the same benchmark: its DDIM step with clipping keeps the model's raw noise estimate
next to the clipped x0, so x_{t-1} = sqrt(abar') x0_clipped + sqrt(1 - abar') eps_raw mixes two
inconsistent estimates. The rows vary exactly that (use_clipped_model_output, no clipping, eta 1,
our DDIM on the same weights).

    python benchmarks/sampling.py [--from benchmarks/results/quality_budget] [--samples 500]

It ends with the pick: the cheapest setting whose FID is within 10% of the table's best.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import (
    DiffusersEpsModel, make_scorer, cached_json, diffusers_samples, diffusers_unet, machine, timed_samples, write_json,
)

from ddpm.data import load_prepared
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.checkpoint import load_model

DDIM_STEPS = (10, 25, 50, 100, 250)


def our_settings() -> list[SamplerConfig]:
    settings = [SamplerConfig(sampler="ddim", num_steps=n, eta=eta, clip_x0=clip)
                for eta in (0.0, 1.0) for clip in (True, False) for n in DDIM_STEPS]
    settings += [SamplerConfig(sampler="ddim", num_steps=n, eta=0.0, spacing=spacing)
                 for spacing in ("linspace", "trailing") for n in DDIM_STEPS]
    settings += [SamplerConfig(sampler="ddpm", num_steps=n, variance=variance)
                 for variance in ("beta", "beta_tilde") for n in (None, 250, 100)]
    return settings


def label(config: SamplerConfig) -> str:
    if config.sampler == "ddpm":
        return f"DDPM-{config.num_steps or 1000} {config.variance}"
    return (f"DDIM-{config.num_steps} eta{config.eta:g} clip-{'on' if config.clip_x0 else 'off'} "
            f"{config.spacing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, default=Path("benchmarks/results/quality_budget"),
                        help="the --out folder of quality_budget.py (data, weights, classifier cache)")
    parser.add_argument("--checkpoint", help="our checkpoint (default: that run's budget-(b) checkpoint)")
    parser.add_argument("--model", default="tiny-16", help="UNet preset of the diffusers weights")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling"))
    args = parser.parse_args()
    from diffusers import DDIMScheduler, DDPMScheduler

    dataset = load_prepared(next((args.source / "data").iterdir()))
    scorer = make_scorer(dataset, args.source / "cache")
    checkpoint = args.checkpoint or json.loads((args.source / "ours.json").read_text())["checkpoints"]["b"]
    model, diffusion, state = load_model(checkpoint)
    schedule = diffusion.make_schedule()
    floor = scorer.floor(args.samples)
    print(machine())
    print(f"our checkpoint {checkpoint} (step {state['step']}); fid_classifier at {args.samples} samples, "
          f"floor {floor:.2f}")

    def row(name: str, draw) -> dict:
        def compute():
            images, seconds = draw()
            return {"fid": scorer.fid(images), "seconds_per_image": seconds}
        result = {"setting": name, **cached_json(args.out / "rows" / f"{name.replace(' ', '_')}.json", compute)}
        print(f"{name:<44}{result['fid']:>9.2f}{1000 * result['seconds_per_image']:>10.2f}", flush=True)
        return result

    print(f"\n{'our sampler on our weights':<44}{'FID':>9}{'ms/img':>10}")
    ours = [{**row(label(c), lambda c=c: timed_samples(model, c.build(schedule), args.samples, args.seed)),
             "config": c.model_dump()} for c in our_settings()]

    unet = diffusers_unet(args.model)
    unet.load_state_dict(torch.load(args.source / "diffusers-ema.pt", weights_only=True))
    ddpm_config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    ddim = DDIMScheduler.from_config(ddpm_config)
    print(f"\n{'on the diffusers weights':<44}{'FID':>9}{'ms/img':>10}")
    theirs = [
        row("diffusers DDPM-1000 (its default)", lambda: diffusers_samples(
            unet, DDPMScheduler.from_config(ddpm_config), 1000, args.samples, args.seed)),
        row("diffusers DDIM-100 (its default)", lambda: diffusers_samples(unet, ddim, 100, args.samples, args.seed)),
        row("diffusers DDIM-100 use_clipped_model_output", lambda: diffusers_samples(
            unet, ddim, 100, args.samples, args.seed, use_clipped_model_output=True)),
        row("diffusers DDIM-100 clip_sample=False", lambda: diffusers_samples(
            unet, DDIMScheduler.from_config(ddpm_config, clip_sample=False), 100, args.samples, args.seed)),
        row("diffusers DDIM-100 eta=1", lambda: diffusers_samples(unet, ddim, 100, args.samples, args.seed, eta=1.0)),
        row("our DDIM-100 eta0 clip-on", lambda: timed_samples(   # over the schedule diffusers trained with
            DiffusersEpsModel(unet).eval(),
            SamplerConfig(sampler="ddim", num_steps=100, eta=0.0).build(DiffusionConfig().make_schedule()),
            args.samples, args.seed)),
    ]

    best = min(r["fid"] for r in ours)
    pick = min((r for r in ours if r["fid"] <= 1.1 * best), key=lambda r: r["seconds_per_image"])
    speed = {r["setting"]: r["seconds_per_image"] for r in ours}
    speedup = speed["DDPM-1000 beta"] / speed["DDIM-100 eta0 clip-on leading"]
    print(f"\nbest FID {best:.2f}; cheapest within 10% of it: {pick['setting']} (FID {pick['fid']:.2f}, "
          f"{1000 * pick['seconds_per_image']:.2f} ms/img)")
    print(f"DDIM-100 is {speedup:.1f}x faster per image than DDPM-1000")
    write_json(args.out / "results.json", {"machine": machine(), "checkpoint": checkpoint, "floor": floor,
                                           "samples": args.samples, "ours": ours, "diffusers_weights": theirs,
                                           "pick": pick, "ddim100_speedup_over_ddpm1000": speedup})


if __name__ == "__main__":
    main()

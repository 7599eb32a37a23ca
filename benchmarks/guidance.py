"""Classifier-free guidance: a class-conditional model against the unconditional one trained for
the same minutes, and the guidance sweep (FID and conditional accuracy against w).

Weights: tiny-16 on MNIST 16x16 (the t10k split, seeded 8000/2000 split, as the other
benchmarks) with the pipeline's recipe, unconditional and class-conditional (p_uncond 0.1), the
same number of steps (what the unconditional model does in --minutes). Each row: --samples
images per seed (seeds 0, 1, 2) from the default sampler (DPM-Solver++ 2M SDE, 20 steps), the
classes in turn; fid_classifier against the 2000 holdout images (mean over seeds), conditional
accuracy (the share of samples the held-out classifier assigns to the class asked for), and
with --inception fid_inception at seed 0.

    python benchmarks/guidance.py [--minutes 5] [--samples 500] [--scales 0 1 1.5 2 3 5]

It ends with the targets: accuracy >= 98% at the best scale with FID <= 1.2x the unconditional
model's; accuracy rising with w and FID having a minimum.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import make_scorer, cached_json, machine, prepare_mnist, recipe_steps, write_json

from ddpm.data import BatchLoader
from ddpm.images import to_uint8
from ddpm.metrics.classifier import accuracy
from ddpm.samplers import SamplerConfig, generate
from ddpm.checkpoint import load_model
from ddpm.training import Trainer
from ddpm.unet import preset
from tasks.config import DEFAULTS
from tasks.evaluate import GUIDANCE_SWEEP


def train(images: torch.Tensor, labels: torch.Tensor | None, steps: int, out: Path) -> dict:
    """The pipeline's recipe on tiny-16 (class-conditional when `labels` are given) for `steps`."""
    config = DEFAULTS.train.model_copy(update={"steps": steps, "device": "cpu", "checkpoint_every": 10**9})
    model = preset("tiny-16", num_classes=10 if labels is not None else None)
    loader = BatchLoader(images, config.batch_size, seed=0, labels=labels)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    trainer = Trainer(model, DEFAULTS.diffusion, config, loader.labelled_batch if labels is not None else loader.batch,
                      checkpoint_dir=out)
    result = trainer.train()
    return {"steps": result.step, "checkpoint": str(result.checkpoints[-1]), "final_loss": result.final_loss,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each model")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=float, nargs="+", default=list(GUIDANCE_SWEEP))
    parser.add_argument("--inception", action=argparse.BooleanOptionalAction, default=True,
                        help="also fid_inception (seed 0; ~0.14 s per image on 2 cores)")
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = prepare_mnist(args.out, mnist_dir=args.mnist)
    images, labels = dataset.split("train")
    print(machine())
    steps = cached_json(args.out / "steps.json", lambda: {"steps": recipe_steps(images, args.minutes)})["steps"]
    weights = {
        "unconditional": cached_json(args.out / "unconditional.json",
                                     lambda: train(images, None, steps, args.out / "unconditional"), announce=True),
        "conditional": cached_json(args.out / "conditional.json",
                                   lambda: train(images, labels, steps, args.out / "conditional"), announce=True),
    }
    scorer = make_scorer(dataset, args.out / "cache", inception=args.inception)
    floors = scorer.floors(args.samples)
    print(f"tiny-16 on MNIST 16x16, {steps} steps ({args.minutes:g} min) each; {args.samples} samples x seeds "
          f"{args.seeds}, {SamplerConfig().describe()}; floors "
          + ", ".join(f"{k} {v:.2f}" for k, v in floors.items())
          + f"; classifier accuracy on real holdout images {100 * scorer.classifier_accuracy:.2f}%")

    def row(name: str, kind: str, scale: float | None) -> dict:
        model, diffusion, _ = load_model(weights[kind]["checkpoint"])
        sampling = SamplerConfig(num_images=args.samples, batch_size=250, guidance_scale=scale)
        sampler = sampling.build(diffusion.make_schedule(), diffusion.prediction_type)
        requested = sampling.class_labels(model.config.num_classes)

        def one(seed: int) -> dict:
            start = time.perf_counter()
            samples = to_uint8(generate(model, sampler, args.samples, seed=seed, batch_size=250,
                                        class_labels=requested, guidance_scale=sampling.guidance()))
            seconds = (time.perf_counter() - start) / args.samples
            result = {"fid_classifier": scorer.fid(samples), "seconds": seconds,
                      "accuracy": accuracy(scorer.classifier, samples, requested) if requested is not None else None}
            if args.inception and seed == args.seeds[0]:
                result["fid_inception"] = scorer.fids(samples)["fid_inception"]
            return result

        per_seed = [cached_json(args.out / "rows" / f"{name}-seed{seed}-{args.samples}.json", lambda s=seed: one(s))
                    for seed in args.seeds]
        fids = [r["fid_classifier"] for r in per_seed]
        out = {"setting": name, "scale": scale, "fid": float(np.mean(fids)), "spread": float(np.ptp(fids)),
               "fid_inception": per_seed[0].get("fid_inception"),
               "accuracy": None if requested is None else float(np.mean([r["accuracy"] for r in per_seed])),
               "ms_per_image": 1000 * float(np.mean([r["seconds"] for r in per_seed]))}
        accuracy_text = "" if out["accuracy"] is None else f"{100 * out['accuracy']:.2f}%"
        inception_text = "" if out["fid_inception"] is None else f"{out['fid_inception']:.2f}"
        print(f"{name:<22}{out['fid']:>10.2f}{out['spread']:>8.2f}{inception_text:>12}{accuracy_text:>10}"
              f"{out['ms_per_image']:>8.2f}", flush=True)
        return out

    print(f"\n{'setting':<22}{'fid_cls':>10}{'spread':>8}{'fid_incep':>12}{'accuracy':>10}{'ms/img':>8}")
    unconditional = row("unconditional", "unconditional", None)
    sweep = [row(f"conditional w={w:g}", "conditional", w) for w in args.scales]

    best = min(sweep, key=lambda r: r["fid"])
    accurate = [r for r in sweep if r["accuracy"] >= 0.98]
    print(f"\nunconditional: fid_classifier {unconditional['fid']:.2f}")
    print(f"lowest FID: w={best['scale']:g} ({best['fid']:.2f} = {best['fid'] / unconditional['fid']:.2f}x "
          f"unconditional, accuracy {100 * best['accuracy']:.2f}%)")
    if accurate:
        pick = min(accurate, key=lambda r: r["fid"])
        verdict = "met" if pick["fid"] <= 1.2 * unconditional["fid"] else "NOT met"
        print(f"target (accuracy >= 98% with FID <= 1.2x unconditional): {verdict} at w={pick['scale']:g} "
              f"(accuracy {100 * pick['accuracy']:.2f}%, FID {pick['fid']:.2f} = "
              f"{pick['fid'] / unconditional['fid']:.2f}x)")
    else:
        print("target (accuracy >= 98%): NOT met at any scale")
    rising = all(a["accuracy"] <= b["accuracy"] + 0.005 for a, b in zip(sweep, sweep[1:]))
    interior = sweep[0] is not best and sweep[-1] is not best
    print(f"accuracy rises with w: {rising}; FID minimum inside the sweep (not at its ends): {interior}")
    write_json(args.out / "results.json", {"machine": machine(), "steps": steps, "weights": weights, "floors": floors,
                                           "args": {k: str(v) for k, v in vars(args).items()},
                                           "unconditional": unconditional, "sweep": sweep})


if __name__ == "__main__":
    main()

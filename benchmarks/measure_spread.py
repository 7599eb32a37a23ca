"""KID against FID at few samples: the bias and the seed spread of each at 100, 300 and 1,000 samples.

One checkpoint (tiny-16 trained for --steps, 1,500 by default, ~2 minutes on 2 CPU cores, on the MNIST test split at 16x16, prepared by the
project's seeded split: 8,000 train, 2,000 holdout; or --checkpoint), sampled with DDIM-50 on
--seeds sampling seeds, 1,000 images each; the first n of each draw are scored at n = 100, 300,
1,000 against the holdout reference with every measure of ddpm.metrics.measures (one feature pass
per set). Beside the model, n real train images (seeded subsets, one per seed) are scored the same
way: what a perfect model scores, so its mean is the measure's bias at n.

    python benchmarks/measure_spread.py [--steps 1500] [--inception] [--out benchmarks/results/measure_spread]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import cached_json, machine, make_scorer, prepare_mnist, write_json

from ddpm.samplers import SamplerConfig
from ddpm.sampling import draw_images, load_sampler

COUNTS = (100, 300, 1000)


def train_checkpoint(dataset, out: Path, steps: int) -> Path:
    from ddpm.training import dataset_trainer
    from ddpm.unet import preset
    from tasks.config import DEFAULTS

    config = DEFAULTS.train.model_copy(update={"device": "cpu", "steps": steps, "checkpoint_every": steps,
                                              "warmup_steps": min(DEFAULTS.train.warmup_steps, steps // 10)})
    print(f"training tiny-16 for {steps} steps")
    trainer = dataset_trainer(dataset.path, preset("tiny-16"), DEFAULTS.diffusion, config, out / "checkpoints")
    return trainer.train(progress=False).checkpoints[-1]


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/measure_spread"))
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=1500, help="training steps of tiny-16 (~2 min on 2 CPU cores)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inception", action="store_true", help="also the Inception features (~0.14 s/image on CPU)")
    parser.add_argument("--report", action="store_true", help="print the tables of the last run's result.json")
    args = parser.parse_args()
    if args.report:
        result = json.loads((args.out / "result.json").read_text())
        extractors = sorted({k.split("_", 1)[1] for k in next(iter(result["summary"].values())) if k.startswith("fid_")})
        return print_tables(result["summary"], extractors)
    torch.manual_seed(0)
    dataset = prepare_mnist(args.out)
    scorer = make_scorer(dataset, args.out / "cache", inception=args.inception)
    checkpoint = args.checkpoint or train_checkpoint(dataset, args.out, args.steps)
    sampling = SamplerConfig(sampler="ddim", num_steps=50, num_images=max(COUNTS))
    model, sampler, step = load_sampler(checkpoint, sampling)
    train, _ = dataset.split("train")
    rows = []
    for seed in range(args.seeds):
        images = cached_json(args.out / f"samples-seed{seed}.json", lambda: draw_images(
            model, sampler, sampling.model_copy(update={"seed": seed}), "cpu")[0].tolist())
        images = torch.tensor(images, dtype=torch.uint8)
        real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[:max(COUNTS)]]
        for n in COUNTS:
            for kind, batch in (("model", images[:n]), ("real", real[:n])):
                start = time.perf_counter()
                scores = scorer.measures(batch)
                rows.append({"seed": seed, "n": n, "kind": kind, "seconds": time.perf_counter() - start, **scores})
                print(f"seed {seed} n {n:5d} {kind:5s} " + " ".join(
                    f"{k} {v:.4g}" for k, v in scores.items() if k.startswith(("fid", "kid"))))
    metrics = [k for k in rows[0] if k not in ("seed", "n", "kind", "seconds")]
    summary = {f"{kind} n={n}": {m: spread([r[m] for r in rows if r["n"] == n and r["kind"] == kind]) for m in metrics}
               for kind in ("model", "real") for n in COUNTS}
    write_json(args.out / "result.json", {"checkpoint": str(checkpoint), "step": step, "sampling": sampling.describe(),
                                          "reference": scorer.extractors["classifier"][1].count, "rows": rows,
                                          "summary": summary, "machine": machine()})
    print(f"\ncheckpoint step {step}, {sampling.describe()}, reference {scorer.extractors['classifier'][1].count} "
          f"holdout images, {args.seeds} sampling seeds (mean ± std over the seeds)")
    print_tables(summary, list(scorer.extractors))


def print_tables(summary: dict, extractors: list[str]) -> None:
    """One markdown table per extractor: each measure's mean ± std over the seeds, and KID's own
    standard deviation over its subsets (the mean of it over the seeds)."""
    for extractor in extractors:
        print(f"\n| set | n | fid_{extractor} | kid_{extractor} | kid_{extractor}_std (subsets) | "
              f"precision_{extractor} | recall_{extractor} |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for key, s in summary.items():
            kind, n = key.split(" n=")
            cell = lambda name, digits: f"{s[name]['mean']:.{digits}f} ± {s[name]['std']:.{digits}f}"  # noqa: E731
            print(f"| {kind} | {int(n):,} | {cell(f'fid_{extractor}', 2)} | {cell(f'kid_{extractor}', 2)} "
                  f"| {s[f'kid_{extractor}_std']['mean']:.2f} | {cell(f'precision_{extractor}', 3)} "
                  f"| {cell(f'recall_{extractor}', 3)} |")


if __name__ == "__main__":
    main()

"""What the nightly retraining loop decides, on real MNIST that grows: is a warm start worth it,
and how often does promotion move the alias between two models of equal quality?

Data. The MNIST train images (../shared/data/mnist-full, --mnist DIR) are written as PNGs in
class sub-folders, the way a growing image folder reaches the pipeline: version 1 holds the first
--v1-images (default 40,000), version 2 all 60,000 (+50%; its first files are hard links to the
same images). Each is prepared as the pipeline prepares a folder: DataConfig(source="folder:DIR",
image_size=16, split="content"), so a v1 train image stays in v2's train split and v2's holdout
(the FID reference) only gains images. Model and recipe: the pipeline's defaults
(tasks.config.DEFAULTS: tiny-16, lr 4e-3 with a cosine decay, cosine noise schedule, Min-SNR-5,
EMA 0.999), with the step count that fits the minutes on this machine (timed over 20 probe
steps, as benchmarks/common.py recipe_steps does) and a cut-off at the deadline all the same.

1. Warm start against scratch. The champion is trained from scratch on v1 for --minutes. On v2,
   at the same wall-clock budget, (a) `warm`: TrainConfig.init_from the champion's final
   checkpoint (its EMA weights, a 50-step warm-up, fresh optimizer and EMA), (b) `scratch`,
   each for every training seed of --seeds. Each run is checkpointed at --points evenly spaced
   minutes (the last at the end) and every checkpoint scored afterwards (not on the clock):
   fid_classifier at --samples samples against v2's holdout, the pipeline's sampler
   (SamplerConfig(): DPM-Solver++ 2M SDE, 20 steps), the mean over --sampling-seeds seeds
   (0, 1000003, ...: tasks.registry.SEED_STRIDE apart). The champion is scored the same way on v2.
   Table 1: FID at each point (minutes, steps), the first point at or below the champion's
   FID on v2 (at checkpoint resolution, or "not reached"), the FID at equal minutes (the end),
   and the real-vs-real floor at that sample count. With several --seeds: their mean, then each.
2. Promotion between equals. Two models of one quality: the scratch arm's final checkpoints of
   the first two --seeds when there are two, else the recipe trained twice on v2 from scratch
   (seeds s and s+1) for the steps that fit in --flip-minutes (both run all those steps, not
   cut off at a deadline that load on the machine could move). Both are scored on the same
   --flip-seeds sampling seeds. Over every ordered draw of 3 of those seeds (or 2,000 random ones when there are
   more), with either model as champion: the strict rule (the challenger's FID on the draw's
   first seed lower than the champion's on that seed: one logged FID each, as runs without a
   head-to-head are compared) against tasks.registry.noise_aware_decision on the 3 paired
   seeds (confidence 0.95). Table 2: how often each rule moves the alias, in both directions.
   The draws share the --flip-seeds seeds, so the rates carry the noise of those few seeds;
   a paired t-test over all of them says how equal the two models really are.

    python benchmarks/retrain_loop.py [--minutes 4] [--seeds 0 [1]] [--samples 500] [--mnist DIR]

Time on 2 CPU cores (default settings, nothing else running): ~24 min. Training is 16 min of it
(champion 4, warm 4, scratch 4, the two flip models 2 + 2); sampling is ~6 s per 500 images, so
26 scorings in 1. and 24 in 2. add ~5 min; writing and preparing the PNGs (~1.5 min) and
training the scorer's classifier (~1 min) happen once: a run into an --out that has them
takes ~21 min. `--seeds 0 1` adds 8 min of training and ~2 min of scoring but trains no flip
models (~30 min in all). Load from other processes slows training and so lowers the steps
that fit in the minutes: run it alone.

Flags: --minutes (training wall clock of the champion and of each v2 run), --points (checkpoints
per run), --seeds (training seeds of the v2 arms; the champion uses the first), --samples (images
per FID), --sampling-seeds (FIDs averaged per checkpoint), --v1-images / --v2-images (the two
folder versions), --flip-minutes (training of the two flip models when --seeds has one seed),
--flip-seeds (sampling seeds each flip model is scored on), --draws (random draws when there are
more ordered triples), --mnist (folder of the MNIST .gz files), --out (results; default
/tmp/retrain-loop), --fresh (retrain and rescore: discards --out's runs and scores, keeps the
PNGs, prepared data and scorer cache).

Each training run's record (JSON, with its checkpoints) and each score are saved under --out
and reused by a rerun with the same settings (a crash late in the run costs only the rest).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from common import ROOT, cached_json, machine, make_scorer, recipe_steps, write_json

from ddpm.data import BatchLoader, load_prepared, prepare_dataset
from ddpm.data.prepare import DataConfig
from ddpm.data.sources.mnist import mnist_present_splits, read_idx
from ddpm.sampling import draw_images, load_sampler
from ddpm.samplers import SamplerConfig
from ddpm.training import Trainer
from tasks.config import DEFAULTS
from tasks.registry import SEED_STRIDE, noise_aware_decision

STARTED = time.perf_counter()
MNIST_FULL_DIR = ROOT.parent / "shared" / "data" / "mnist-full"
SAMPLER = SamplerConfig()          # the pipeline's: DPM-Solver++ 2M SDE, 20 steps
PROGRESS_EVERY_S = 30
CONFIDENCE = 0.95


def log(line: str) -> None:
    """A progress line stamped with the minutes since the start."""
    print(f"[{(time.perf_counter() - STARTED) / 60:5.1f} min] {line}", flush=True)


# --- data ----------------------------------------------------------------------------------

def write_png_folder(images: np.ndarray, labels: np.ndarray, folder: Path, link_from: Path | None = None) -> Path:
    """images[i] as folder/<label>/<i:05d>.png, written under a temporary name and renamed at the
    end (an existing folder is complete); files that `link_from` holds are hard-linked from it."""
    if folder.is_dir():
        return folder
    from PIL import Image

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for label in np.unique(labels):
        (tmp / str(label)).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        name = Path(str(label)) / f"{i:05d}.png"
        source = link_from / name if link_from is not None else None
        if source is not None and source.is_file():
            try:
                os.link(source, tmp / name)
                continue
            except OSError:
                pass
        Image.fromarray(image).save(tmp / name)
    os.rename(tmp, folder)
    return folder


def prepare_versions(mnist_dir: Path, out: Path, v1_images: int, v2_images: int | None):
    """(v1, v2) PreparedDatasets of the first v1_images / v2_images MNIST train images as folders."""
    present = mnist_present_splits(Path(mnist_dir))
    if "train" not in present:
        raise SystemExit(f"no MNIST train files (train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz) in "
                         f"{mnist_dir}; pass --mnist DIR")
    images_path, labels_path = present["train"]
    images, labels = read_idx(images_path, 0x00000803, None), read_idx(labels_path, 0x00000801, None)
    v2_images = v2_images or len(images)
    if not 2 <= v1_images < v2_images <= len(images):
        raise SystemExit(f"need 2 <= --v1-images ({v1_images}) < --v2-images ({v2_images}) <= {len(images)}")
    folders = out / "images"
    folders.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    v2_dir = write_png_folder(images[:v2_images], labels[:v2_images], folders / f"mnist-train-first-{v2_images}")
    v1_dir = write_png_folder(images[:v1_images], labels[:v1_images], folders / f"mnist-train-first-{v1_images}",
                              link_from=v2_dir)
    versions = []
    for folder in (v1_dir, v2_dir):
        config = DataConfig(source=f"folder:{folder.resolve()}", image_size=16, split="content")
        versions.append(load_prepared(prepare_dataset(config, out / "data")))
    log(f"data: PNG folders and preparation {time.perf_counter() - start:.0f} s")
    return versions


def hash_set(dataset, split: str) -> set[bytes]:
    index = dataset.train_indices if split == "train" else dataset.holdout_indices
    return {bytes(h) for h in dataset.content_hashes[index].numpy()}


# --- training ------------------------------------------------------------------------------

def train_run(key: str, label: str, images, minutes: float, steps: int, seed: int, points: int, runs_dir: Path,
              init_from: str | None = None, cut_off: bool = True) -> dict:
    """The pipeline's recipe for `steps` steps (the cosine decay ends there), cut off after
    `minutes` (unless not `cut_off`: then all the steps); a checkpoint (EMA inside) at each of
    `points` evenly spaced minutes, the last at the end."""
    folder = runs_dir / key
    shutil.rmtree(folder, ignore_errors=True)   # a crashed earlier attempt: start clean
    train = DEFAULTS.train.model_copy(update={"steps": steps, "seed": seed, "device": "cpu", "init_from": init_from,
                                              "checkpoint_every": 10**9, "keep_last": 10**6})
    loader = BatchLoader(images, train.batch_size, seed=seed)
    trainer = Trainer(DEFAULTS.model, DEFAULTS.diffusion, train, loader.batch, checkpoint_dir=folder)
    if init_from:
        trainer.warm_start(init_from)
    marks = [minutes * k / points for k in range(1, points)]
    checkpoints, losses = [], []
    start = last_report = time.perf_counter()
    deadline = start + 60 * minutes

    def checkpoint(now: float) -> None:
        checkpoints.append({"path": str(trainer.save()), "step": trainer.step, "minutes": (now - start) / 60})
        log(f"  {label}: checkpoint {len(checkpoints)}/{points} at {(now - start) / 60:.2f} min, "
            f"step {trainer.step}/{steps}")

    while trainer.step < steps:
        losses.append(trainer.train_step()[0])
        now = time.perf_counter()
        if marks and now - start >= 60 * marks[0]:
            marks.pop(0)
            checkpoint(now)
        if now - last_report >= PROGRESS_EVERY_S:
            log(f"  {label}: {(now - start) / 60:.1f}/{minutes:g} min, step {trainer.step}/{steps}, "
                f"loss {np.mean(losses[-100:]):.4f}")
            last_report = now
        if cut_off and now >= deadline:
            break
    seconds = time.perf_counter() - start
    if not checkpoints or checkpoints[-1]["step"] != trainer.step:
        checkpoint(start + seconds)
    return {"key": key, "label": label, "seed": seed, "init_from": init_from, "steps": trainer.step, "planned_steps": steps,
            "minutes": seconds / 60, "budget_minutes": minutes, "images": len(images),
            "final_loss": float(np.mean(losses[-100:])), "checkpoints": checkpoints}


class StepPlanner:
    """Steps that fit in some minutes for a dataset's train images, probed once per dataset."""

    def __init__(self):
        self.per_minute = {}

    def steps(self, name: str, images, minutes: float) -> int:
        if name not in self.per_minute:
            self.per_minute[name] = recipe_steps(images, 1.0)
            log(f"  probe on {name}: {self.per_minute[name]} steps per minute")
        return max(1, int(self.per_minute[name] * minutes))


# --- scoring -------------------------------------------------------------------------------

class CheckpointScores:
    """fid_classifier of a checkpoint's EMA weights per sampling seed, kept in a JSON file (keyed
    by the checkpoint's path and mtime, the sample count and the seed) so a rerun reuses them."""

    def __init__(self, scorer, samples: int, path: Path):
        self.scorer, self.samples, self.path = scorer, samples, path
        self.known = json.loads(path.read_text()) if path.exists() else {}

    def fids(self, checkpoint: str, seeds: list[int]) -> list[float]:
        stamp = Path(checkpoint).stat().st_mtime_ns
        keys = [f"{checkpoint}|{stamp}|{self.samples}|{seed}" for seed in seeds]
        missing = [(key, seed) for key, seed in zip(keys, seeds) if key not in self.known]
        if missing:
            model, sampler, _ = load_sampler(checkpoint, SAMPLER)
            for key, seed in missing:
                sampling = SAMPLER.model_copy(update={"num_images": self.samples, "seed": seed, "batch_size": 250})
                self.known[key] = self.scorer.fid(draw_images(model, sampler, sampling, "cpu")[0])
            write_json(self.path, self.known)
        return [self.known[key] for key in keys]


def sampling_seeds(count: int) -> list[int]:
    return [k * SEED_STRIDE for k in range(count)]   # images of one seed are never those of another


def score_run(run: dict, scores: CheckpointScores, seeds: list[int]) -> list[dict]:
    curve = []
    for point in run["checkpoints"]:
        fids = scores.fids(point["path"], seeds)
        curve.append({"minutes": point["minutes"], "step": point["step"], "fids": fids,
                      "fid": statistics.fmean(fids)})
        log(f"  {run['label']}: {point['minutes']:.2f} min, step {point['step']}: FID {curve[-1]['fid']:.2f} "
            f"({', '.join(f'{f:.2f}' for f in fids)})")
    return curve


def first_reach(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["fid"] <= target), None)


def arm_summary(curves: list[list[dict]], champion_fid: float) -> dict:
    """The mean curve over training seeds (points aligned by index), where it and each seed
    first reach the champion's FID, and each seed's end."""
    length = min(len(c) for c in curves)
    mean_curve = [{"minutes": statistics.fmean(c[k]["minutes"] for c in curves),
                   "step": statistics.fmean(c[k]["step"] for c in curves),
                   "fid": statistics.fmean(c[k]["fid"] for c in curves),
                   "per_seed": [c[k]["fid"] for c in curves]} for k in range(length)]
    end = {"minutes": statistics.fmean(c[-1]["minutes"] for c in curves),
           "step": statistics.fmean(c[-1]["step"] for c in curves),
           "fid": statistics.fmean(c[-1]["fid"] for c in curves), "per_seed": [c[-1]["fid"] for c in curves]}
    return {"curve": mean_curve, "end": end, "reach": first_reach(mean_curve, champion_fid),
            "reach_per_seed": [first_reach(c, champion_fid) for c in curves]}


# --- promotion between equals --------------------------------------------------------------

def flip_rates(fids_a: list[float], fids_b: list[float], max_draws: int, seed: int = 0) -> dict:
    """How often each rule moves the alias between A and B over draws of 3 of the seeds."""
    n = len(fids_a)
    ordered = math.perm(n, 3)
    if ordered <= max_draws:
        draws = list(itertools.permutations(range(n), 3))
    else:
        rng = random.Random(seed)
        draws = [tuple(rng.sample(range(n), 3)) for _ in range(max_draws)]
    counts = {"strict": {"a_to_b": 0, "b_to_a": 0}, "noise_aware": {"a_to_b": 0, "b_to_a": 0}}
    for draw in draws:
        first = draw[0]
        counts["strict"]["a_to_b"] += fids_b[first] < fids_a[first]   # B challenges champion A
        counts["strict"]["b_to_a"] += fids_a[first] < fids_b[first]
        a, b = [fids_a[i] for i in draw], [fids_b[i] for i in draw]
        counts["noise_aware"]["a_to_b"] += noise_aware_decision(b, a, CONFIDENCE)[0]
        counts["noise_aware"]["b_to_a"] += noise_aware_decision(a, b, CONFIDENCE)[0]
    rates = {rule: {direction: count / len(draws) for direction, count in moves.items()}
             for rule, moves in counts.items()}
    for moves in rates.values():
        moves["either"] = (moves["a_to_b"] + moves["b_to_a"]) / 2
    return {"draws": len(draws), "all_ordered_draws": ordered <= max_draws, "combinations": math.comb(n, 3),
            "counts": counts, "rates": rates}


def paired_test(fids_a: list[float], fids_b: list[float]) -> dict:
    from scipy.stats import ttest_rel

    differences = [b - a for a, b in zip(fids_a, fids_b)]
    return {"a_mean": statistics.fmean(fids_a), "a_std": statistics.stdev(fids_a),
            "b_mean": statistics.fmean(fids_b), "b_std": statistics.stdev(fids_b),
            "difference_mean": statistics.fmean(differences), "difference_std": statistics.stdev(differences),
            "p_two_sided": float(ttest_rel(fids_b, fids_a).pvalue)}


# --- printing ------------------------------------------------------------------------------

def fid_cell(point: dict | None, with_seeds: bool) -> str:
    if point is None:
        return "-"
    seeds = " (" + " / ".join(f"{f:.2f}" for f in point["per_seed"]) + ")" if with_seeds else ""
    return f"{point['fid']:.2f}{seeds} at {point['minutes']:.2f} min, {point['step']:.0f} steps"


def reach_cell(summary: dict, with_seeds: bool) -> str:
    def one(point):
        return "not reached" if point is None else f"{point['minutes']:.2f} min, {point['step']:.0f} steps"
    seeds = " (" + " / ".join(one(p) for p in summary["reach_per_seed"]) + ")" if with_seeds else ""
    return one(summary["reach"]) + seeds


def print_tables(record: dict, args) -> None:
    champion, arms, flip = record["champion"], record["arms"], record["flip"]
    several = len(args.seeds) > 1
    seeds_note = f"mean of training seeds {' / '.join(map(str, args.seeds))} (each in brackets)" if several \
        else f"training seed {args.seeds[0]}"
    data = record["data"]
    print(f"\n### Warm start vs scratch on grown data: v1 {data['v1']['count']} -> v2 {data['v2']['count']} "
          f"MNIST images (16x16, tiny-16)\n")
    print(f"fid_classifier at {args.samples} samples against v2's holdout ({data['v2']['holdout']} images), "
          f"{SAMPLER.describe()}, mean of {args.sampling_seeds} sampling seeds; {args.minutes:g} min per run; "
          f"{seeds_note}.\n")
    print("| | warm start (from the champion) | scratch |")
    print("|---|---|---|")
    print(f"| start | the champion: {champion['fid']:.2f} on v2 (trained on v1: {champion['run']['minutes']:.2f} min, "
          f"{champion['run']['steps']} steps) | random init |")
    length = max(len(arms[name]["curve"]) for name in ("warm", "scratch"))
    for k in range(length):
        cells = [fid_cell(arms[name]["curve"][k] if k < len(arms[name]["curve"]) else None, several)
                 for name in ("warm", "scratch")]
        print(f"| point {k + 1} | {cells[0]} | {cells[1]} |")
    print(f"| equal minutes (the end) | {fid_cell(arms['warm']['end'], several)} | "
          f"{fid_cell(arms['scratch']['end'], several)} |")
    print(f"| reaches the champion's {champion['fid']:.2f} | {reach_cell(arms['warm'], several)} | "
          f"{reach_cell(arms['scratch'], several)} |")
    print(f"| floor (real vs real, {args.samples}) | {record['floor']:.2f} | {record['floor']:.2f} |")

    equal = flip["models"]
    test = flip["paired"]
    print(f"\n### How often promotion moves the alias between two models of equal quality\n")
    print(f"A = {equal['a']}, B = {equal['b']}; each scored on the same {args.flip_seeds} sampling seeds: "
          f"A {test['a_mean']:.2f} ± {test['a_std']:.2f}, B {test['b_mean']:.2f} ± {test['b_std']:.2f}, "
          f"B - A {test['difference_mean']:+.2f} ± {test['difference_std']:.2f} "
          f"(paired t-test over all {args.flip_seeds}: p = {test['p_two_sided']:.2f}). "
          f"{flip['draws']} {'(all) ' if flip['all_ordered_draws'] else 'random '}ordered draws of 3 seeds "
          f"({flip['combinations']} combinations).\n")
    print("| rule | A champion, B moves in | B champion, A moves in | either (a challenger of equal quality wins) |")
    print("|---|---|---|---|")
    names = {"strict": "strict: lower FID on one seed wins",
             "noise_aware": f"noise-aware: paired t-test on 3 seeds, confidence {CONFIDENCE:g}"}
    for rule, label in names.items():
        r = flip["rates"][rule]
        print(f"| {label} | {100 * r['a_to_b']:.1f}% | {100 * r['b_to_a']:.1f}% | {100 * r['either']:.1f}% |")


# --- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall clock of the champion and of each v2 run")
    parser.add_argument("--points", type=int, default=6, help="checkpoints scored per run (the last at the end)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds of the v2 arms (the champion uses the first); two also give the flip models")
    parser.add_argument("--samples", type=int, default=500, help="images per FID")
    parser.add_argument("--sampling-seeds", type=int, default=2, help="sampling seeds averaged at each checkpoint")
    parser.add_argument("--v1-images", type=int, default=40_000, help="MNIST train images in version 1")
    parser.add_argument("--v2-images", type=int, default=None, help="MNIST train images in version 2 (default: all 60,000)")
    parser.add_argument("--flip-minutes", type=float, default=2.0,
                        help="training of each flip model when --seeds has one seed")
    parser.add_argument("--flip-seeds", type=int, default=12, help="sampling seeds each flip model is scored on")
    parser.add_argument("--draws", type=int, default=2000, help="random draws of 3 seeds when there are more ordered ones")
    parser.add_argument("--mnist", type=Path, default=MNIST_FULL_DIR, help="folder with the MNIST train .gz files")
    parser.add_argument("--out", type=Path, default=Path("/tmp/retrain-loop"))
    parser.add_argument("--fresh", action="store_true", help="retrain and rescore (keeps PNGs, prepared data, scorer cache)")
    args = parser.parse_args()
    if args.points < 1 or args.sampling_seeds < 1 or args.flip_seeds < 3:
        parser.error("need --points >= 1, --sampling-seeds >= 1 and --flip-seeds >= 3")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must differ")
    runs_dir, scores_path = args.out / "runs", args.out / f"scores-{args.samples}.json"
    if args.fresh:
        shutil.rmtree(runs_dir, ignore_errors=True)
        scores_path.unlink(missing_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(machine(), flush=True)

    v1, v2 = prepare_versions(args.mnist, args.out, args.v1_images, args.v2_images)
    v1_train, _ = v1.split("train")
    v2_train, _ = v2.split("train")
    kept = hash_set(v1, "train") <= hash_set(v2, "train")
    data = {name: {"path": str(d.path), "count": len(d.images), "train": len(d.train_indices),
                   "holdout": len(d.holdout_indices), "fingerprint": d.fingerprint} for name, d in (("v1", v1), ("v2", v2))}
    log(f"v1: {data['v1']['count']} images ({data['v1']['train']} train / {data['v1']['holdout']} holdout); "
        f"v2: {data['v2']['count']} ({data['v2']['train']} / {data['v2']['holdout']}); "
        f"every v1 train image in v2's train split: {kept}")
    scorer = make_scorer(v2, args.out / "cache")
    floor = scorer.floor(args.samples)
    log(f"scorer: classifier accuracy {scorer.classifier_accuracy:.4f}, fid_classifier floor at {args.samples} "
        f"samples {floor:.2f}")
    scores = CheckpointScores(scorer, args.samples, scores_path)
    seeds = sampling_seeds(args.sampling_seeds)
    planner = StepPlanner()

    def run(label: str, key: str, images, dataset: str, minutes: float, seed: int,
            init_from: str | None = None, points: int | None = None, cut_off: bool = True) -> dict:
        """A training run's record, reused from an earlier run with the same key while its checkpoints exist."""
        path = runs_dir / f"{key}.json"
        if path.exists() and not all(Path(c["path"]).is_file() for c in json.loads(path.read_text())["checkpoints"]):
            path.unlink()

        def compute():
            log(f"training {label} ({key}, {minutes:g} min) ...")
            return train_run(key, label, images, minutes, planner.steps(dataset, images, minutes), seed,
                             points or args.points, runs_dir, init_from, cut_off)
        return cached_json(path, compute, announce=True)

    champion_key = f"champion-v1first{args.v1_images}-{args.minutes:g}min-s{args.seeds[0]}"
    champion_run = run("champion", champion_key, v1_train, "v1", args.minutes, args.seeds[0])
    champion_checkpoint = champion_run["checkpoints"][-1]["path"]
    champion_fids = scores.fids(champion_checkpoint, seeds)
    champion_fid = statistics.fmean(champion_fids)
    log(f"champion on v2's reference: FID {champion_fid:.2f} ({', '.join(f'{f:.2f}' for f in champion_fids)})")

    v2_name = f"v2first{len(v2.images)}"
    runs = {"warm": [], "scratch": []}
    for seed in args.seeds:
        runs["warm"].append(run(f"warm s{seed}", f"warm-{v2_name}-from-{champion_key}-{args.minutes:g}min-s{seed}",
                                v2_train, "v2", args.minutes, seed, init_from=champion_checkpoint))
        runs["scratch"].append(run(f"scratch s{seed}", f"scratch-{v2_name}-{args.minutes:g}min-s{seed}",
                                   v2_train, "v2", args.minutes, seed))
    arms = {}
    for name, arm_runs in runs.items():
        curves = [score_run(r, scores, seeds) for r in arm_runs]
        arms[name] = {**arm_summary(curves, champion_fid), "runs": arm_runs, "curves": curves}

    if len(args.seeds) >= 2:
        flip_runs = runs["scratch"][:2]
    else:
        # equal quality: the same recipe to the same step count (the steps that fit in the
        # minutes), not cut off at a deadline that load on the machine could move
        flip_runs = [run(f"flip s{seed}", f"flip-{v2_name}-{args.flip_minutes:g}min-s{seed}", v2_train, "v2",
                         args.flip_minutes, seed, points=1, cut_off=False) for seed in (args.seeds[0], args.seeds[0] + 1)]
    flip_seeds = sampling_seeds(args.flip_seeds)
    flip_fids = []
    for label, flip_run in zip("AB", flip_runs):
        log(f"scoring flip model {label} ({flip_run['label']}) on {args.flip_seeds} sampling seeds ...")
        flip_fids.append(scores.fids(flip_run["checkpoints"][-1]["path"], flip_seeds))
    flip = {**flip_rates(flip_fids[0], flip_fids[1], args.draws), "paired": paired_test(*flip_fids),
            "models": {"a": f"{flip_runs[0]['label']} ({flip_runs[0]['minutes']:.2f} min, {flip_runs[0]['steps']} steps)",
                       "b": f"{flip_runs[1]['label']} ({flip_runs[1]['minutes']:.2f} min, {flip_runs[1]['steps']} steps)"},
            "fids": {"a": flip_fids[0], "b": flip_fids[1]}, "sampling_seeds": flip_seeds, "confidence": CONFIDENCE}

    record = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "data": data,
              "v1_train_kept_in_v2_train": kept, "sampler": SAMPLER.describe(), "sampling_seeds": seeds,
              "samples": args.samples, "floor": floor, "classifier_accuracy": scorer.classifier_accuracy,
              "recipe": {"model": DEFAULTS.model.model_dump(mode="json"),
                         "diffusion": DEFAULTS.diffusion.model_dump(mode="json"),
                         "train": DEFAULTS.train.model_dump(mode="json")},
              "champion": {"fid": champion_fid, "fids": champion_fids, "run": champion_run},
              "arms": arms, "flip": flip, "wall_minutes": (time.perf_counter() - began) / 60}
    print_tables(record, args)
    write_json(args.out / "results.json", record)
    print(f"\n{record['wall_minutes']:.1f} min in all; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()

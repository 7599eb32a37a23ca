"""Months of nights on a growing folder: preparation time, memory, disk (issue 39).

    .venv/bin/python benchmarks/data_scale.py [--sizes 5000 20000 60000] [--skip-memory] [--skip-disk]

1. Preparation of MNIST train images written as PNGs (class folders) at each size: the first
   preparation, an unchanged night (prepare_dataset finds its folder: one listing, the load's
   fingerprint check skipped by its stamp), a night with 1% more images (incremental), and a
   re-stamped folder (every mtime new, same bytes: hashed, no new copy). DataConfig defaults
   (16x16, center_crop: every image is resampled).
2. Memory over the process's RSS after its imports, against the prepared dataset's image bytes, at
   the largest size prepared at 32x32 (pad), each in its own process, anonymous RSS (copies) and
   file-backed RSS (the mapped data) apart: training (dataset_trainer; `setup_anon` once the
   trainer is built, `data_*` what one epoch of batches added, so every image was read; `peak_*`
   after 5 steps of tiny-16 at batch 32 as well), the
   same with the loading before this change (`train-copy`: arrays read, the split copied), and
   evaluation (the scorer: the dataset's classifier trained for 1 epoch, reference statistics, floor,
   the score of 1,000 images; `stage_*`: each stage's peak and end). The children run with
   MALLOC_MMAP_THRESHOLD_=65536, so that a freed tensor leaves RSS (glibc's dynamic threshold
   otherwise keeps freed blocks in its heap: the RSS then counts memory no longer in use).
3. Disk under DDPM_HOME after 10 simulated nights, 5 with new images (+1% each), retention on and
   off: each night prepares the folder for real, records an MLflow run on its data (a real sqlite
   store) with 9 MB of checkpoints (what a training night wrote here), a 1.5 MB downloaded registry
   copy and a reference-cache file per data version, and ends as the nightly retrain does
   (tasks.retention.after_night). No network is trained: the files are the size real ones were.
Prints one JSON object; the load average is recorded beside each figure.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = Path(os.environ.get("DDPM_MNIST_FULL", "/work/shared/data/mnist-full"))


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    x = np.frombuffer(gzip.open(MNIST / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(MNIST / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return x, y


def write_pngs(folder: Path, x: np.ndarray, y: np.ndarray, indices) -> None:
    from PIL import Image

    for i in indices:
        target = folder / str(int(y[i]))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(target / f"{i:05d}.png")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 3)


def preparation(sizes: list[int], work: Path) -> dict:
    from ddpm.data import DataConfig, prepare_dataset

    x, y = mnist_train()
    out = {}
    for n in sizes:
        base = n - n // 101   # the first night's images; +1% of them arrive the next
        folder, prepared = work / f"png-{n}" / "mnist", work / f"prepared-{n}"
        write_pngs(folder, x, y, range(base))
        config = DataConfig(source=f"folder:{folder}")
        row = {"images": base}
        first, row["first_s"] = timed(lambda: prepare_dataset(config, prepared))
        row["first_load"] = load()
        again, row["unchanged_s"] = timed(lambda: prepare_dataset(config, prepared))
        assert again == first
        write_pngs(folder, x, y, range(base, n))
        grown, row["plus_1pct_s"] = timed(lambda: prepare_dataset(config, prepared))
        row["plus_1pct_images"] = n
        assert grown != first
        copy = folder.with_name("copy")
        shutil.copytree(folder, copy, copy_function=shutil.copy)   # cp without -p: new mtimes, same bytes
        shutil.rmtree(folder)
        copy.rename(folder)
        restamped, row["restamped_s"] = timed(lambda: prepare_dataset(config, prepared))
        row["restamped_same_folder"] = restamped == grown
        row["load"] = load()
        out[str(n)] = row
        print(json.dumps({n: row}), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- memory (one process each)

def _rss() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {key: int(status[key].split()[0]) for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    return {key: value * 1024 for key, value in kib.items()}


def _peak_sampler():
    """The peak anonymous and file-backed RSS, sampled every 20 ms in a thread."""
    import threading

    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            now = _rss()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak, stop, thread


def memory_child(kind: str, path: str) -> None:
    import functools

    import torch

    from ddpm.data import BatchLoader, load_prepared
    from ddpm.diffusion import DiffusionConfig
    from ddpm.metrics import scoring
    from ddpm.training import TrainConfig, Trainer, dataset_trainer
    from ddpm.unet import preset

    torch.set_num_threads(2)
    torch.zeros(1).sum()
    base = _rss()
    peak, stop, thread = _peak_sampler()
    result = {}
    model = preset("tiny-16").model_copy(update={"image_size": 32})
    train = TrainConfig(batch_size=32, steps=5, seed=0, checkpoint_every=10**9)
    if kind in ("train", "train-copy"):
        if kind == "train":
            trainer = dataset_trainer(path, model, DiffusionConfig(), train, None)
            loader = trainer.batch_fn.__self__
        else:   # the path before issue 39: every array read into memory, the train split copied
            with np.load(Path(path) / "data.npz") as npz:
                images, rows = torch.from_numpy(npz["images"]), torch.from_numpy(npz["train_indices"])
            loader = BatchLoader(images[rows], train.batch_size, seed=0)
            trainer = Trainer(model, DiffusionConfig(), train, loader.batch, None)
        ready = _rss()   # the trainer built (model, optimizer, EMA) and, for train-copy, the arrays read
        for step in range(len(loader)):   # every image read once
            loader.batch(step)
        now = _rss()
        result.update(setup_anon=ready["RssAnon"] - base["RssAnon"],
                      data_anon=now["RssAnon"] - ready["RssAnon"], data_file=now["RssFile"] - ready["RssFile"])
        trainer.train()
    else:
        # the classifier trained 1 epoch instead of 4: memory is per batch, the epochs change the time only
        scoring.load_or_train_classifier = functools.partial(scoring.load_or_train_classifier, epochs=1, min_steps=1)
        # each stage's peak anonymous RSS over the start: where evaluation's memory goes
        def stage(name):
            now = _rss()
            result[f"stage_{name}_peak_anon"] = peak["RssAnon"] - base["RssAnon"]
            result[f"stage_{name}_anon"] = now["RssAnon"] - base["RssAnon"]
            time.sleep(0.05)   # the sampler sees the stage's end before the next one starts
            peak["RssAnon"] = now["RssAnon"]

        dataset = load_prepared(Path(path))
        stage("load")
        with tempfile.TemporaryDirectory() as cache:
            extractor, facts = scoring.make_extractor(dataset, "classifier", cache)
            stage("classifier")
            scorer = scoring.Scorer.build(dataset, ["classifier"], cache)   # the classifier from its cache
            stage("reference")
            scorer.floors(1000)
            stage("floors")
            samples = dataset.images[:1000].clone()
            scorer.score(samples)
            stage("score")
    stop.set()
    thread.join()
    end = _rss()
    stage_peaks = [v for k, v in result.items() if k.endswith("_peak_anon")]
    result.update(peak_rss=end["VmHWM"] - base["VmRSS"],
                  peak_anon=max([peak["RssAnon"] - base["RssAnon"], *stage_peaks]),
                  peak_file=peak["RssFile"] - base["RssFile"])
    print(json.dumps(result))


def memory(path: Path) -> dict:
    from ddpm.data import load_prepared

    dataset = load_prepared(path)
    data_bytes = dataset.images.numel()
    out = {"dataset_image_bytes": data_bytes, "images": len(dataset.images)}
    for kind in ("train", "train-copy", "evaluate"):
        before = load()
        (result, seconds) = timed(lambda: subprocess.run(
            [sys.executable, __file__, "--memory-child", kind, str(path)], capture_output=True, text=True,
            check=True, env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}))
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        figures.update({f"{k}_x_dataset": round(v / data_bytes, 2) for k, v in list(figures.items())},
                       seconds=seconds, load_before=before, load_after=load())
        out[kind] = figures
        print(json.dumps({kind: figures}), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- disk over nights

def nights(work: Path, retention_on: bool, x, y, nights_total: int = 10, grow_on=(1, 3, 5, 7, 9)) -> dict:
    from mlflow.tracking import MlflowClient

    from ddpm.data import DataConfig, load_prepared, prepare_dataset
    from tasks import contract, retention

    home = work / ("home-on" if retention_on else "home-off")
    folder = work / ("src-on" if retention_on else "src-off")
    os.environ["DDPM_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["DDPM_RETENTION"] = "on" if retention_on else "off"
    home.mkdir(parents=True)
    count = 5000
    write_pngs(folder, x, y, range(count))
    config = DataConfig(source=f"folder:{folder}")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("nightly", artifact_location=(home / "mlartifacts").as_uri())
    client.create_registered_model("ddpm")
    rng = np.random.default_rng(0)
    per_night = []
    for night in range(nights_total):
        before = retention.usage(home)
        if night in grow_on:
            write_pngs(folder, x, y, range(count, count + count // 100))
            count += count // 100
        data = load_prepared(prepare_dataset(config, home / "data"))
        run = client.create_run(experiment, start_time=1_000 + night, tags={
            contract.DATASET_FINGERPRINT_TAG: data.fingerprint, contract.DATASET_PATH_TAG: str(data.path)})
        run_id = run.info.run_id
        checkpoints = home / "runs" / run_id / "checkpoints"
        checkpoints.mkdir(parents=True)
        for step in (1000, 2000, 3000):   # keep_last 3, ~3 MB each
            (checkpoints / f"step-{step:07d}.pt").write_bytes(rng.bytes(3_033_000))
        client.set_terminated(run_id)
        version = client.create_model_version("ddpm", f"runs:/{run_id}/model", run_id=run_id)
        if night % 3 == 0:   # the challenger won: the alias moves, its bundle was downloaded
            client.set_registered_model_alias("ddpm", "champion", version.version)
        bundle = home / "registry" / "ddpm" / f"{version.version}-{run_id[:8]}"
        bundle.mkdir(parents=True)
        (bundle / "model.pt").write_bytes(rng.bytes(1_500_000))
        metrics = home / "cache" / "metrics"
        metrics.mkdir(parents=True, exist_ok=True)
        (metrics / f"classifier-{data.fingerprint[:16]}.pt").write_bytes(rng.bytes(420_000))
        disk = retention.after_night(home, before, run_id, log=lambda line: None)
        per_night.append({"night": night + 1, "new_data": night in grow_on, **{k: round(v / 2**20, 2) for k, v in
                                                                               [("used_mib", disk["used_bytes"]),
                                                                                ("freed_mib", disk["freed_bytes"]),
                                                                                ("home_mib", disk["home_bytes"])]}})
    return {"home_mib_after": per_night[-1]["home_mib"], "nights": per_night, "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--memory-child", nargs=2)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    os.environ.setdefault("DO_NOT_TRACK", "true")
    results = {"cpus": len(os.sched_getaffinity(0)), "load_at_start": load()}
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        work = Path(tmp)
        if not args.skip_prepare:
            results["preparation"] = preparation(args.sizes, work)
        if not args.skip_memory:
            from ddpm.data import DataConfig, prepare_dataset

            x, y = mnist_train()
            n = max(args.sizes)
            folder = work / f"png-{n}" / "mnist"
            if not folder.is_dir():
                write_pngs(folder, x, y, range(n))
            path = prepare_dataset(DataConfig(source=f"folder:{folder}", image_size=32, resize="pad"), work / "mem")
            results["memory"] = memory(path)
        if not args.skip_disk:
            x, y = mnist_train()
            results["disk"] = {"retention_on": nights(work, True, x, y), "retention_off": nights(work, False, x, y)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Training from prepared data larger than the memory it may use (issue 39, item 3).

    sudo .venv/bin/python benchmarks/beyond_memory.py [--image-size 64] [--steps 20] [--readahead]

Prepares MNIST (train + test, 70,000 images) at 64x64 RGB (pad): 860 MB of images, the size of a
CIFAR-sized set of 280,000 images. Then, each in its own process:

1. `free`: dataset_trainer on it (the train split read in place from the memory map), every batch
   of one epoch gathered (so every image is read from disk), then --steps training steps;
2. `limited`: the same inside a cgroup (v1 memory controller) whose limit is the free run's
   anonymous peak plus 128 MiB: far less than the images, so the page cache the mapped file uses
   must be given back as the epoch goes (the images are file-backed, clean: the kernel drops and
   re-reads them);
3. with --readahead, `limited` again with the kernel's readahead on the mapping (the loading before
   random access was advised for data beyond memory).

Printed: the images' bytes, the limit, each run's seconds for the epoch of batches and for the
steps, its peak anonymous RSS, the cgroup's peak charge and failcnt, and whether the batches of
the two runs are equal (sha256 of a sample of them). Needs root for the cgroup (or a delegated
memory cgroup); without one, only the free run. Linux only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = Path(os.environ.get("DDPM_MNIST_FULL", ROOT.parent / "shared" / "data" / "mnist-full"))
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def anon_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon")).split()[1])


def child(path: str, image_size: int, steps: int, readahead: bool) -> None:
    import threading

    import torch

    if readahead:   # the mapping as before: the kernel's readahead whatever the memory
        import ddpm.data.prepare

        ddpm.data.prepare.memory_available = lambda: 2**62

    from ddpm.diffusion import DiffusionConfig
    from ddpm.training import TrainConfig, dataset_trainer
    from ddpm.unet import preset

    torch.set_num_threads(2)
    peak = [anon_kib()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    model = preset("tiny-16").model_copy(update={"image_size": image_size, "in_channels": 3})
    config = TrainConfig(batch_size=16, steps=steps, seed=0, checkpoint_every=10**9, log_every=10**9)
    started = time.perf_counter()
    trainer = dataset_trainer(path, model, DiffusionConfig(), config, None)
    load_seconds = time.perf_counter() - started
    loader = trainer.batch_fn.__self__
    digest = hashlib.sha256()
    started = time.perf_counter()
    for step in range(len(loader)):   # one epoch: every image read
        batch = loader.batch(step)
        if step % 97 == 0:
            digest.update(batch.numpy().tobytes())
    epoch_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = trainer.train(progress=False)
    steps_seconds = time.perf_counter() - started
    stop.set()
    print(json.dumps({"load_seconds": round(load_seconds, 2), "epoch_batches": len(loader),
                      "epoch_seconds": round(epoch_seconds, 2), "steps_seconds": round(steps_seconds, 2),
                      "final_loss": result.final_loss, "peak_anon_mib": round(peak[0] / 1024, 1),
                      "batches_sha256": digest.hexdigest()[:16]}))


def drop_page_cache() -> bool:
    """Drop clean cached pages (root only), so that a run reads the images from disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def run(path: Path, args, cgroup: Path | None = None, drop_caches: bool = False, readahead: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(path), "--image-size", str(args.image_size),
               "--steps", str(args.steps)] + (["--readahead"] if readahead else [])
    if cgroup is not None:   # join the cgroup, then become the child
        command = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cold = drop_caches and drop_page_cache()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"failed": done.returncode, "stderr": done.stderr[-1500:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "page_cache_dropped_before": cold}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child")
    parser.add_argument("--readahead", action="store_true",
                        help="a third run in the cgroup with the mapping's readahead (the loading before)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.image_size, args.steps, args.readahead)
        return
    from ddpm.data import DataConfig, load_prepared, prepare_dataset

    with tempfile.TemporaryDirectory(prefix="beyond-memory-") as tmp:
        started = time.perf_counter()
        path = prepare_dataset(DataConfig(source=f"mnist:{MNIST}", split="random", image_size=args.image_size,
                                          channels=3, resize="pad"), Path(tmp))
        dataset = load_prepared(path)
        image_bytes = dataset.images.numel()
        out = {"images": len(dataset.images), "image_mib": round(image_bytes / 2**20, 1),
               "prepare_seconds": round(time.perf_counter() - started, 1)}
        del dataset
        out["free"] = run(path, args, drop_caches=True)
        print(json.dumps(out), file=sys.stderr)
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists() or "peak_anon_mib" not in out["free"]:
            out["limited"] = "no cgroup v1 memory controller at /sys/fs/cgroup/memory (or the free run failed)"
        else:
            cgroup = CGROUP_ROOT / f"ddpm-beyond-memory-{os.getpid()}"
            limit_mib = int(out["free"]["peak_anon_mib"]) + 128
            try:
                cgroup.mkdir()
                (cgroup / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
                out["limit_mib"] = limit_mib
                out["limited"] = run(path, args, cgroup, drop_caches=True)
                out["limited"].update(
                    cgroup_peak_mib=round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
                    cgroup_failcnt=int((cgroup / "memory.failcnt").read_text()))
                if args.readahead:
                    out["limited_readahead"] = run(path, args, cgroup, drop_caches=True, readahead=True)
            except OSError as error:
                out["limited"] = f"cannot use a memory cgroup here: {error}"
            finally:
                try:
                    cgroup.rmdir()
                except OSError:
                    pass
        if isinstance(out.get("limited"), dict) and "batches_sha256" in out["limited"]:
            out["same_batches"] = out["limited"]["batches_sha256"] == out["free"]["batches_sha256"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

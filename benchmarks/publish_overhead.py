"""What publishing checkpoints to a tracking server costs training (tasks.run_files.CheckpointPublisher).

    python benchmarks/publish_overhead.py                  # the default recipe (1,500 steps, a checkpoint every 500)
    python benchmarks/publish_overhead.py --checkpoint-every 100 --steps 600   # a checkpoint every 7 s or so

A real `mlflow server` with proxied artifacts on 127.0.0.1 (the team stack's kind), the pipeline's
default model, data and TrainConfig, trained in this process as the training task does, with the
publisher as the on_checkpoint callback ("on") or none ("off"), alternately `--repeats` times each.
Printed side by side: the median seconds per training step over the log windows (checkpoint I/O
excluded, as the Trainer times it) and the whole train() wall time (checkpoints included), the
bytes uploaded per checkpoint and per run, how long the uploads still ran after training (close()),
and how long another host takes to fetch the newest checkpoint to resume from it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "DO_NOT_TRACK": "true"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the MLflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="publish-bench-"))
    os.environ["DDPM_HOME"] = str(work / "home")
    server, url = start_server(work)
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        run(args, work, url)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, url: str) -> None:
    import torch

    from ddpm.checkpoint import list_checkpoints
    from ddpm.data import prepare_dataset
    from ddpm.training import dataset_trainer
    from tasks import run_files, tracking
    from tasks.config import DEFAULTS

    config = DEFAULTS.with_settings({k: v for k, v in {"train.steps": args.steps,
                                                        "train.checkpoint_every": args.checkpoint_every}.items()
                                     if v is not None})
    train = config.train.model_copy(update={"progress_images": 0, "device": "cpu"})
    dataset = prepare_dataset(config.data, work / "data")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; tracking server "
          f"{url} (proxied artifacts); {train.steps} steps, batch {train.batch_size}, a checkpoint every "
          f"{train.checkpoint_every} (keep_last {train.keep_last})")
    rows = {"off": [], "on": []}
    for repeat in range(args.repeats):
        for arm in ("off", "on"):
            run_id = tracking.create_run("publish-bench", f"{arm}-{repeat}", {})
            folder = work / "runs" / run_id / "checkpoints"
            trainer = dataset_trainer(dataset, config.model, config.diffusion, train, folder)
            windows: list[float] = []

            def on_log(step, metrics):
                if "images_per_second" in metrics:
                    windows.append(train.batch_size / metrics["images_per_second"])

            publisher = run_files.CheckpointPublisher(run_id, folder, train.keep_last) if arm == "on" else None
            started = time.perf_counter()
            trainer.train(on_log=on_log, on_checkpoint=publisher, progress=False)
            wall = time.perf_counter() - started
            closing = time.perf_counter()
            stored = publisher.close() if publisher else []
            closing = time.perf_counter() - closing
            size = list_checkpoints(folder)[-1].stat().st_size
            row = {"step_s": statistics.median(windows), "wall_s": wall, "close_s": closing if publisher else 0.0,
                   "bytes": publisher.bytes_uploaded if publisher else 0, "checkpoint_bytes": size,
                   "stored": stored, "run_id": run_id}
            rows[arm].append(row)
            print(f"  {arm:3} #{repeat}: median {row['step_s'] * 1000:.1f} ms/step, train() {wall:.1f} s, "
                  f"uploads after training {row['close_s']:.2f} s, {row['bytes'] / 2**20:.1f} MiB uploaded, "
                  f"stored {stored}", flush=True)

    # another host resumes: a fresh DDPM_HOME fetches the newest stored checkpoint
    os.environ["DDPM_HOME"] = str(work / "host-b")
    run = tracking.client().get_run(rows["on"][-1]["run_id"])
    started = time.perf_counter()
    fetched = run_files.newest_valid_checkpoint(run)
    fetch_s = time.perf_counter() - started

    def median(arm, key):
        return statistics.median(r[key] for r in rows[arm])

    off, on = median("off", "step_s"), median("on", "step_s")
    print()
    print("| | uploads off | uploads on | on / off |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| median s/step (log windows) | {off * 1000:.1f} ms | {on * 1000:.1f} ms | {on / off:.3f} |")
    print(f"| train() wall time, checkpoints included | {median('off', 'wall_s'):.1f} s | "
          f"{median('on', 'wall_s'):.1f} s | {median('on', 'wall_s') / median('off', 'wall_s'):.3f} |")
    print(f"| uploads still running after training | - | {median('on', 'close_s'):.2f} s | |")
    checkpoint_mib = rows["on"][-1]["checkpoint_bytes"] / 2**20
    print(f"| uploaded per checkpoint / per run | - | {checkpoint_mib:.2f} MiB (+ 82 B checksum) / "
          f"{median('on', 'bytes') / 2**20:.1f} MiB | |")
    print(f"| another host fetches the newest checkpoint to resume | - | {fetch_s:.2f} s ({fetched.name}) | |")
    spread = max(r["step_s"] for r in rows["off"]) / min(r["step_s"] for r in rows["off"]) - 1
    print(f"\nrun-to-run spread of 'off' alone: {spread * 100:.1f}% (a difference below it is a tie)")


if __name__ == "__main__":
    main()

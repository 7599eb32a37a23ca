"""Data-parallel scaling: images/s of the pipeline's training in 1 process vs 2 processes under
torchrun (gloo, this machine's CPU cores), the communication share of a step, and on paper the
scaling to expect on 8 GPUs from each preset's gradient size.

    python benchmarks/scaling.py [--presets tiny-16 small-16] [--batch 64] [--steps 60]

Measured, per preset, all through `python -m ddpm.train_ddp --events` (the command the training
task launches), same global batch, same data (the digits at 16x16):
  1 process   one process with every core (the pipeline's default: no torchrun)
  2 processes torchrun --nproc-per-node 2, one core (thread) each, half the batch each
  1 rank      one process, one thread, half the batch: a rank's compute without communication
images/s is the median over the log windows after the first (warm-up). The communication share
of a 2-process step is 1 - t(1 rank) / t(2 processes): gradient all-reduce, waiting for the
slower rank, and what gloo's threads take from the compute. `all-reduce` times gloo's all-reduce
of a gradient-sized tensor alone (2 processes, the mean of 20).

On paper (8 GPUs, the DDPM paper's global batch of 128, 16 per GPU): ring all-reduce moves
2 (N-1)/N x the gradient bytes per GPU; its time at a given bus bandwidth (NCCL's "busbw") is
set against the compute time of a step at an assumed utilisation of an H100's bf16 peak. These
are estimates, not measurements: no GPU was used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from ddpm.data import DataConfig, prepare_dataset
from ddpm.torchrun import parse_event
from ddpm.unet import UNet, count_parameters, preset
from ddpm.utilisation import training_flops_per_image

REPO = Path(__file__).resolve().parents[1]
# On paper: NCCL all-reduce bus bandwidth (GB/s) of three interconnects, and the H100 SXM's dense
# bf16 peak at an assumed 30% model-FLOPs utilisation (large convolutional UNets reach 30-50%;
# small ones less: their steps are bound by kernel launches, a few ms whatever the FLOPs).
BUS_BANDWIDTH_GBS = {"NVLink/NVSwitch (8x H100)": 360.0, "PCIe 4.0 (8 GPUs, no NVLink)": 20.0,
                     "2 nodes, 400 Gb/s InfiniBand": 40.0}
H100_BF16_TFLOPS, ASSUMED_MFU, LAUNCH_FLOOR_MS = 989.0, 0.30, 3.0
PAPER_PRESETS = ["tiny-16", "small-16", "tiny-32", "article-32", "ddpm-cifar10"]


def run_training(data: Path, model: str, batch: int, steps: int, processes: int, threads: int) -> float:
    """Median images/s over the log windows after the first, of `ddpm.train_ddp` in `processes` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        train = {"steps": steps, "batch_size": batch, "log_every": 10, "checkpoint_every": 10**9, "warmup_steps": 0}
        args = ["-m", "ddpm.train_ddp", "--data", str(data), "--checkpoint-dir", tmp, "--model", model,
                "--train", json.dumps(train), "--events", "--no-progress"]
        command = [sys.executable, *args] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if done.returncode:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    events = [parse_event(line) for line in done.stdout.splitlines()]
    windows = [event["metrics"]["images_per_second"] for event in events if event and event["event"] == "log"]
    return statistics.median(windows[1:])


ALLREDUCE = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.randn(int(sys.argv[1]))
for _ in range(3): dist.all_reduce(x)
dist.barrier(); start = time.perf_counter()
for _ in range(20): dist.all_reduce(x)
dist.barrier()
if dist.get_rank() == 0: print((time.perf_counter() - start) / 20 * 1000)
dist.destroy_process_group()
"""


def allreduce_ms(numel: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(ALLREDUCE)
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               script.name, str(numel)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(script.name)


def on_paper(presets: list[str], gpus: int = 8, global_batch: int = 128) -> None:
    per_gpu = global_batch // gpus
    rate = H100_BF16_TFLOPS * 1e12 * ASSUMED_MFU
    print(f"\nOn paper: {gpus} GPUs vs 1, global batch {global_batch} ({per_gpu} per GPU); compute at "
          f"{ASSUMED_MFU:.0%} of {H100_BF16_TFLOPS:.0f} TFLOP/s bf16, at least {LAUNCH_FLOOR_MS:g} ms a step "
          "(kernel launches); all-reduce not overlapped with backward (worst case)")
    header = f"{'preset':<13} {'params':>11} {'grad MB':>8} {'1 GPU ms':>9} {f'{gpus} GPU ms':>9}"
    for link in BUS_BANDWIDTH_GBS:
        header += f" | {link[:28]:<28}"
    print(header)
    for name in presets:
        params = count_parameters(UNet(preset(name)))
        grad_bytes = 4 * params   # fp32 gradients (bf16 autocast keeps fp32 weights and gradients)
        flops = training_flops_per_image(preset(name))
        one_gpu_ms = max(LAUNCH_FLOOR_MS, flops * global_batch / rate * 1e3)
        compute_ms = max(LAUNCH_FLOOR_MS, flops * per_gpu / rate * 1e3)
        row = f"{name:<13} {params:>11,} {grad_bytes / 1e6:>8.1f} {one_gpu_ms:>9.2f} {compute_ms:>9.2f}"
        for bandwidth in BUS_BANDWIDTH_GBS.values():
            comm_ms = 2 * (gpus - 1) / gpus * grad_bytes / (bandwidth * 1e9) * 1e3
            row += f" | comm {comm_ms:5.2f} ms, {one_gpu_ms / (compute_ms + comm_ms):4.1f}x    "
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-16", "small-16"])
    parser.add_argument("--batch", type=int, default=64, help="global batch (the pipeline's recipe: 64)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--paper-only", action="store_true", help="only the on-paper table (no training)")
    args = parser.parse_args()
    if args.paper_only:
        return on_paper(PAPER_PRESETS)
    cores = len(os.sched_getaffinity(0))
    print(json.dumps(machine()))
    data = Path(prepare_dataset(DataConfig(), Path(tempfile.gettempdir()) / "ddpm-scaling-data"))
    print(f"{'preset':<10} {'1 process':>16} {'2 processes':>16} {'speed-up':>8} {'1 rank':>14} "
          f"{'comm share':>10} {'all-reduce':>10}")
    for name in args.presets:
        start = time.perf_counter()
        one = run_training(data, name, args.batch, args.steps, 1, cores)
        two = run_training(data, name, args.batch, args.steps, 2, max(1, cores // 2))
        rank = run_training(data, name, args.batch // 2, args.steps, 1, max(1, cores // 2))
        step_two = args.batch / two                         # seconds per global step, 2 processes
        step_rank = (args.batch // 2) / rank                # a rank's compute alone
        share = max(0.0, 1 - step_rank / step_two)
        reduce_ms = allreduce_ms(count_parameters(UNet(preset(name))))
        print(f"{name:<10} {one:>10.0f} img/s {two:>10.0f} img/s {two / one:>7.2f}x {rank:>8.0f} img/s "
              f"{share:>10.0%} {reduce_ms:>7.2f} ms   ({step_two * 1e3:.0f} ms/step at 2 processes; "
              f"{time.perf_counter() - start:.0f} s)")
    on_paper(PAPER_PRESETS)


if __name__ == "__main__":
    main()

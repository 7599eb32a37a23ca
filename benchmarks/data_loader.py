"""Throughput of BatchLoader.batch alone, and its share of a training step.

The reference step is a small conv net's forward + backward + Adam update on the same batch:
far smaller than the DDPM UNet, so the percentage printed is an upper bound on the loader's
share of a real step. Run: python benchmarks/data_loader.py [--steps 200]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, not installed
from ddpm.data import BatchLoader  # noqa: E402


def reference_net(channels: int) -> nn.Module:
    """~80k-parameter conv stack: a lower bound on the cost of a DDPM step at this size."""
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, channels, 3, padding=1),
    )


def time_loader(loader: BatchLoader, steps: int) -> float:
    """Seconds per batch over `steps` steps that cross an epoch boundary (a new permutation)."""
    start_step = max(0, loader.steps_per_epoch - steps // 2)
    loader.batch(start_step)   # warm-up
    t0 = time.perf_counter()
    for k in range(start_step, start_step + steps):
        loader.batch(k)
    return (time.perf_counter() - t0) / steps


def time_step(x: torch.Tensor, steps: int) -> float:
    """Seconds per forward + backward + optimizer step of the reference net on batch x."""
    net = reference_net(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    noise = torch.randn_like(x)

    def step():
        loss = nn.functional.mse_loss(net(x + noise), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="loader batches timed per case")
    parser.add_argument("--net-steps", type=int, default=10, help="reference steps timed per case")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [("16x16x1", 10_000, 1, 16), ("32x32x3", 50_000, 3, 32)]   # MNIST-ish, CIFAR-10-sized
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128")
    header = f"{'data':<9} {'hflip':<5} {'loader ms/batch':>15} {'images/s':>11} {'ref step ms':>11} {'loader % of step':>16}"
    print(header)
    print("-" * len(header))
    for name, n, channels, size in cases:
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
        step_s = time_step(BatchLoader(images, 128).batch(0), args.net_steps)
        for hflip in (False, True):
            loader_s = time_loader(BatchLoader(images, 128, seed=0, hflip=hflip), args.steps)
            print(f"{name:<9} {str(hflip):<5} {loader_s * 1e3:>15.3f} {128 / loader_s:>11,.0f} "
                  f"{step_s * 1e3:>11.1f} {100 * loader_s / step_s:>15.2f}%")


if __name__ == "__main__":
    main()

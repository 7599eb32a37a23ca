"""Training throughput of our UNet against diffusers' UNet2DModel at the same configuration.

Both models get the same optimizer step (forward, MSE loss, backward, Adam) on the same batches.
The two are interleaved round by round in one process, so the machine's drift cancels; the
table reports the median over rounds and the ratio (ours / diffusers, higher is better).

    pip install -e ".[bench]"
    python benchmarks/train_throughput.py [--rounds 5] [--steps 3] [--configs tiny-16 small-16 ddpm-cifar10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from common import DIFFUSERS_CONFIGS, diffusers_unet

from ddpm.unet import PRESETS, UNet, count_parameters

BATCH_SIZES = {"ddpm-cifar10": 32, "small-16": 128, "tiny-16": 64}


def make_step(model, forward, batch):
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.randn(batch, *shape_of(model))
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x, t), noise)
        loss.backward()
        optimizer.step()

    return step


def shape_of(model):
    config = model.config
    if hasattr(config, "image_size"):
        return (config.in_channels, config.image_size, config.image_size)
    return (config.in_channels, config.sample_size, config.sample_size)


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny-16", "small-16", "ddpm-cifar10"], choices=sorted(DIFFUSERS_CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and model")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'config':<14}{'batch':>6}{'params ours':>14}{'params diffusers':>18}"
          f"{'ours ms/img':>13}{'diffusers ms/img':>18}{'ratio':>8}")
    for name in args.configs:
        torch.manual_seed(0)
        ours = UNet(PRESETS[name]).train()
        theirs = diffusers_unet(name).train()
        batch = BATCH_SIZES[name]
        steps = {
            "ours": make_step(ours, ours, batch),
            "diffusers": make_step(theirs, lambda x, t: theirs(x, t).sample, batch),
        }
        for step in steps.values():  # warm-up: allocator, oneDNN primitives
            step()
        seconds = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                seconds[key].append(timed(step, args.steps))
        ms_per_image = {key: 1000 * statistics.median(values) / batch for key, values in seconds.items()}
        print(f"{name:<14}{batch:>6}{count_parameters(ours):>14,}{count_parameters(theirs):>18,}"
              f"{ms_per_image['ours']:>13.2f}{ms_per_image['diffusers']:>18.2f}"
              f"{ms_per_image['diffusers'] / ms_per_image['ours']:>7.2f}x")


if __name__ == "__main__":
    main()

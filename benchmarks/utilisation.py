"""Training speed against what the hardware can do: FLOPs per training image, the machine's
measured matmul peak, achieved GFLOP/s and model-FLOPs utilisation (MFU), ours and diffusers'
UNet2DModel at equal configuration, each in the variants asked for.

    python benchmarks/utilisation.py [--configs tiny-16 small-16] [--variants eager channels_last bf16 compile]
                                     [--rounds 5] [--steps 3] [--device cpu|cuda]

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one training step (forward,
MSE, backward: the convolutions, matmuls and attention; elementwise work is not counted, the
usual MFU convention) and divided by the batch. The peak is the best of a few large square
matmuls (n = 2048 on CPU, 8192 on CUDA) on the same threads, fp32 and bf16. MFU = achieved /
peak of the variant's precision (for bf16, the better of the two peaks). Variants: eager (fp32), channels_last, bf16 (autocast), compile
(torch.compile of the model, default mode), compile+bf16, channels_last+bf16, fused_adam (Adam's fused
CPU kernel instead of its foreach default). Steps of both models run interleaved,
round by round, so drift of the machine cancels; the table gives the median over rounds.
Compilation time and the number of graphs dynamo compiled (after warm-up, and again after the
timed rounds: equal means no recompilation) are printed with each compiled variant. Runs as is
on a CUDA machine (--device cuda).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common import diffusers_unet, machine

from ddpm.unet import PRESETS, UNet
from ddpm.utilisation import matmul_peak, synchronize

BATCH_SIZES = {"ddpm-cifar10": 32, "small-16": 128, "tiny-16": 64, "tiny-32": 64}
VARIANTS = ("eager", "channels_last", "bf16", "channels_last+bf16", "fused_adam", "compile", "compile+bf16")


class Step:
    """One optimizer step (forward, MSE, backward, Adam) of `model` on fixed batches, in a variant."""

    def __init__(self, model: torch.nn.Module, call, variant: str, batch: int, shape, device: torch.device):
        self.model, self.variant, self.device = model.to(device).train(), variant, device
        self.x = torch.randn(batch, *shape, device=device)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.noise = torch.randn_like(self.x)
        if variant.startswith("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.forward = call(torch.compile(self.model) if variant.startswith("compile") else self.model)
        fused = device.type == "cuda" or variant == "fused_adam" or None   # fused Adam: CUDA's default, and a CPU kernel
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4, fused=fused)
        self.bf16 = variant.endswith("bf16")

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext():
            loss = F.mse_loss(self.forward(self.x, self.t).float(), self.noise)
        loss.backward()
        self.optimizer.step()


def count_flops(step: Step) -> int:
    # SDPA's math backend: torch has no FLOP formula for the fused CPU attention kernel (it would count 0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def model_pair(name: str):
    """(name, fresh model, how to call it as eps(x, t)) for ours and diffusers' twin."""
    torch.manual_seed(0)
    return (("ours", UNet(PRESETS[name]), lambda m: m),
            ("diffusers", diffusers_unet(name), lambda m: (lambda x, t: m(x, t).sample)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny-16", "small-16"], choices=sorted(BATCH_SIZES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine())
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    print(f"matmul peak on {torch.get_num_threads()} threads: fp32 {peaks['fp32']:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s")
    print(f"\n{'config':<10}{'variant':<15}{'model':<11}{'GFLOP/img':>10}{'ms/img':>9}{'GFLOP/s':>9}{'MFU':>7}"
          f"{'vs diffusers eager':>20}  notes")
    for name in args.configs:
        batch, config = BATCH_SIZES[name], PRESETS[name]
        shape = (config.in_channels, config.image_size, config.image_size)
        # FLOPs per image, counted on the eager models: compiling and bf16 change how, not what, is computed
        flops = {model_name: count_flops(Step(model, call, "eager", batch, shape, device)) / batch
                 for model_name, model, call in model_pair(name)}
        steps, notes = {}, {}
        for variant in args.variants:
            for model_name, model, call in model_pair(name):
                step = Step(model, call, variant, batch, shape, device)
                graphs, start = compiled_graphs(), time.perf_counter()
                step()   # warm-up (and compilation)
                step()
                synchronize(device)
                if variant.startswith("compile"):
                    notes[(variant, model_name)] = (f"compile + 2 steps {time.perf_counter() - start:.0f} s, "
                                                    f"{compiled_graphs() - graphs} graphs")
                steps[(variant, model_name)] = step
        graphs_before = compiled_graphs()
        seconds = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                synchronize(device)
                seconds[key].append((time.perf_counter() - start) / args.steps / batch)
        recompiled = compiled_graphs() - graphs_before
        baseline = statistics.median(seconds[("eager", "diffusers")]) if ("eager", "diffusers") in seconds else None
        for (variant, model_name), values in seconds.items():
            per_image = statistics.median(values)
            achieved = flops[model_name] / per_image / 1e9
            # a bf16 variant against the better of the two peaks: where bf16 matmuls are slower than
            # fp32 (no bf16 kernels for this CPU), fp32 is what the hardware offers
            peak = max(peaks.values()) if variant.endswith("bf16") else peaks["fp32"]
            speedup = f"{baseline / per_image:.2f}x" if baseline else ""
            print(f"{name:<10}{variant:<15}{model_name:<11}{flops[model_name] / 1e9:>10.3f}{1000 * per_image:>9.2f}"
                  f"{achieved:>9.1f}{100 * achieved / peak:>6.1f}%{speedup:>20}  {notes.get((variant, model_name), '')}",
                  flush=True)
        if any(v.startswith("compile") for v in args.variants):
            print(f"{name}: graphs compiled during the {args.rounds} timed rounds: {recompiled} (0: no recompilation)")


if __name__ == "__main__":
    main()

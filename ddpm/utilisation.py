"""Hardware utilisation of training: model FLOPs per image, the device's peak, and their ratio.

    achieved FLOP/s = (FLOPs of forward + backward per image) x (images per second)
    MFU             = achieved FLOP/s / peak FLOP/s

FLOPs are what torch's FlopCounterMode counts: convolutions, matmuls and attention (counted
through SDPA's math backend: torch has no FLOP formula for the fused CPU kernel, which would
count 0). The GroupNorm/SiLU/add chains and the optimizer count as none, so MFU says how close
the model's matrix work runs to the hardware's best, not how busy the device is. The peak is measured, not
looked up: the best large matmul this device runs in the training precision (benchmarks and
the training task use the same function). `training_utilisation` puts the figures together for a
training just done, in one process or many.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddpm.training import TrainConfig, resolve_device
from ddpm.unet import UNet, UNetConfig


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_image(config: UNetConfig, batch: int = 2) -> float:
    """FLOPs of one training image's forward and backward pass through a UNet of `config`,
    counted on the CPU with a small batch (per-image FLOPs do not depend on the batch)."""
    x = torch.zeros(batch, config.in_channels, config.image_size, config.image_size)   # values do not change FLOPs
    t = torch.zeros(batch, dtype=torch.long)
    # the initial weights and dropout draw from the global generator: leave the caller's state as it was
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        model = UNet(config)
        with FlopCounterMode(display=False) as counter:   # a class-conditional model: the null class, as cheap
            model(x, t).float().square().mean().backward()
    return counter.get_total_flops() / batch


def matmul_peak(dtype: torch.dtype, device: torch.device, tf32: bool = False, repeats: int = 5) -> float:
    """The best GFLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype` on `device` with this
    process's threads; fp32 on CUDA with TF32 if `tf32`. Measured once per process and setting
    (~1 s on a CPU core); the process's own TF32 setting is left as it was."""
    tf32 = tf32 and device.type == "cuda"
    return _matmul_peak(dtype, device, tf32, repeats, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _matmul_peak(dtype: torch.dtype, device: torch.device, tf32: bool, repeats: int, threads: int) -> float:
    n = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device=device).manual_seed(0)   # not the global one: the caller's state stays
    a, b = (torch.randn(n, n, device=device, generator=generator).to(dtype) for _ in range(2))
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        if device.type == "cuda":   # the first call starts cuBLAS: not the peak
            torch.matmul(a, b)
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = time.perf_counter() - start
        if best > 2.0 and device.type == "cpu":   # no fast kernel for this dtype (bf16 on many CPUs): one call says enough
            repeats = 0
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * n**3 / best / 1e9


def training_utilisation(model_config: UNetConfig, train_config: TrainConfig, images_per_second: float,
                         logger: logging.Logger | logging.LoggerAdapter | None = None) -> dict[str, float]:
    """How close a training of `model_config` with `train_config` ran to the hardware, given the
    images/s it reached: FLOPs per image, achieved GFLOP/s, the devices' matmul peak in the
    training precision, and their ratio (MFU); {} when no step was trained. A measurement that
    fails is a warning to `logger` (this module's by default) and {}: the training it describes is done."""
    if not images_per_second:   # no step trained (a resume of a finished run)
        return {}
    try:
        device = resolve_device(train_config.device)
        dtype = torch.bfloat16 if train_config.autocast_bf16(device) else torch.float32
        # one GPU per process; CPU processes share each node's cores, which this process's peak uses
        devices = train_config.world_size if device.type == "cuda" else train_config.nnodes
        flops = training_flops_per_image(model_config)
        # TF32 as the Trainer trains on CUDA
        achieved, peak = flops * images_per_second / 1e9, matmul_peak(dtype, device, tf32=True) * devices
    except Exception as error:
        logger = logging.getLogger(__name__) if logger is None else logger
        logger.warning(f"no utilisation figures: {type(error).__name__}: {error}")
        return {}
    return {"gflops_per_image": flops / 1e9, "achieved_gflops_per_second": achieved,
            "peak_gflops_per_second": peak, "mfu": achieved / peak}

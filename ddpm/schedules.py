"""Noise schedules: the betas of the forward process and every quantity derived from them.

One `NoiseSchedule` object owns the schedule tensors (as diffusers' schedulers do), computed
once in float64 so that products over 1000 steps keep their precision:

    alphas_t         = 1 - beta_t
    alphas_cumprod_t = prod_{s<=t} alpha_s                    (alpha-bar in the paper)
    q(x_t | x_0)     = N(sqrt(alphas_cumprod_t) x_0, (1 - alphas_cumprod_t) I)

The posterior q(x_{t-1} | x_t, x_0) (eqs. 6-7) is ddpm.diffusion.posterior_coefficients, for
consecutive steps and respaced pairs alike.

Timesteps are 0-based here: index t in [0, T) is the paper's step t+1.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


# --- beta generators: each returns float64 betas of length num_timesteps --------------------

def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM (Ho et al. 2020): betas evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM code's 'quad': square roots evenly spaced, then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Latent/Stable Diffusion's 'scaled_linear': the quadratic form with its own endpoints."""
    return quadratic_betas(num_timesteps, beta_start, beta_end)


def betas_from_alphas_cumprod(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int, max_beta: float) -> Tensor:
    """beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta (iDDPM eq. 17)."""
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    values = alpha_bar(grid)
    return (1 - values[1:] / values[:-1]).clamp(max=max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2)."""
    return betas_from_alphas_cumprod(
        lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2, num_timesteps, max_beta
    )


def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid alpha_bar (Jabri et al. 2022, 'Scalable Adaptive Computation'), as in lucidrains'."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))

    def alpha_bar(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alphas_cumprod(alpha_bar, num_timesteps, max_beta)


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "quadratic": quadratic_betas,
    "scaled_linear": scaled_linear_betas,
}


def at_timesteps(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] in `like`'s dtype and device, shaped (B, 1, 1, ...) to broadcast against it."""
    return table.to(device=like.device, dtype=like.dtype)[t].reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """The forward-process variances beta_1..beta_T and all the tensors derived from them.

    Build one from a name (`NoiseSchedule.from_name("cosine", 1000)`) or from any beta array
    (`NoiseSchedule(betas)`). All tensors are float64 on the CPU; `gather` indexes them by a
    batch of timesteps and casts to the batch's device and dtype.
    """

    def __init__(self, betas: Sequence[float] | Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().clone()
        if betas.numel() < 1:
            raise ValueError("noise schedule: betas must hold at least one value (T >= 1)")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            bad = betas[~(torch.isfinite(betas) & (betas > 0) & (betas < 1))][:3].tolist()
            raise ValueError(f"noise schedule '{name}': every beta must lie in (0, 1); got {bad}")
        self.name = name
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas = 1.0 - betas
        self.sqrt_alphas = self.alphas.sqrt()
        self.sqrt_betas = betas.sqrt()
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self._device_cache: dict[tuple, Tensor] = {}

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kwargs) -> "NoiseSchedule":
        """A named schedule: one of `BETA_SCHEDULES` (kwargs go to its beta generator)."""
        if name not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown noise schedule '{name}'; choose one of {sorted(BETA_SCHEDULES)} "
                "or pass your own betas to NoiseSchedule(betas)"
            )
        if int(num_timesteps) != num_timesteps or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps}")
        return cls(BETA_SCHEDULES[name](int(num_timesteps), **kwargs), name=name)

    def gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """self.<name>[t] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device.

        Copies of each table are kept per (device, dtype) so sampling loops on a GPU do not
        copy the schedule from the host at every step.
        """
        key = (name, like.device, like.dtype)
        table = self._device_cache.get(key)
        if table is None:
            table = self._device_cache[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return at_timesteps(table, t, like)

    def signal_to_noise(self) -> Tensor:
        """SNR(t) = alphas_cumprod / (1 - alphas_cumprod), falling with t."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(name={self.name!r}, T={self.num_timesteps}, "
            f"beta=[{self.betas[0]:.3g}..{self.betas[-1]:.3g}], "
            f"alphas_cumprod[T-1]={self.alphas_cumprod[-1]:.3g})"
        )

"""Few-step solvers of the diffusion ODE/SDE: DPM-Solver++ (2M and its SDE variant), UniPC (bh2)
and Heun on Karras sigmas, over the discrete schedule a model was trained with.

Notation (VP): x_t = alpha_t x_0 + sigma_t eps, alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t,
lambda_t = log(alpha_t / sigma_t) (half the log-SNR). Every solver works on the data prediction
D(x, t) = x_0-hat (from an eps-, x0- or v-prediction network, optionally clipped to [-1, 1]):

    DPM-Solver++ (Lu et al. 2022), h = lambda_i - lambda_{i-1}:
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^-h - 1) D',
        D' = D_{i-1} (1st order) or (1 + 1/2r) D_{i-1} - (1/2r) D_{i-2}, r = h_{i-1} / h (2M)
    SDE-DPM-Solver++ (2M, midpoint):
        x_i = (sigma_i / sigma_{i-1}) e^-h x_{i-1} + alpha_i (1 - e^-2h) (D_{i-1} + (D_{i-1} - D_{i-2}) / 2r)
              + sigma_i sqrt(1 - e^-2h) z
    UniPC (Zhao et al. 2023), B(h) = e^-h - 1 ("bh2"): the same exponential-integrator predictor,
        then a corrector that reuses the network's output at the new point (no extra evaluation)
    Heun (Karras et al. 2022, EDM): on s = sigma / alpha, dx/ds = (x - D) / s, the trapezoid rule
        between Karras sigmas s_i = (s_max^(1/7) + i/(N-1) (s_min^(1/7) - s_max^(1/7)))^7

Steps go from the noisiest trained timestep (t = T-1, or where lambda = -5.1 when the schedule
goes lower, as the cosine one does) to t = 0 on a grid uniform in lambda (DPM-Solver, UniPC) or
in s^(1/7) (Heun), then a last step to sigma = 0 that returns D itself; the SDE variant of
DPM-Solver++ steps uniformly in t instead, its last evaluation at start / steps.
The step grid is part of each solver: on time-uniform steps the deterministic multistep solvers
lose to DDIM, while the SDE variant gains (docs/benchmarks.md section 7); each takes the better one.
The network sees fractional timesteps between the trained integers (its sinusoidal embedding
takes any real t); alpha and sigma there interpolate log(abar) linearly, as diffusers does.

`num_steps` is the number of network evaluations (NFE) for the multistep solvers; Heun takes
2 per step but the last, so NFE = 2 * steps - 1 and `num_steps` is rounded down to that form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import numpy as np
import torch

from ddpm.schedules import NoiseSchedule

Tensor = torch.Tensor
PredictionType = Literal["epsilon", "x0", "v"]
ModelFn = Callable[[Tensor, Tensor], Tensor]   # (x_t, t as a float tensor (B,)) -> network output
NoiseFn = Callable[[], Tensor]                 # a fresh N(0, I) batch, per-image seeded


class ContinuousSchedule:
    """lambda, alpha and sigma at any real t in [0, T-1]: lambda is interpolated linearly between
    the trained integer timesteps (so is log(sigma / alpha) = -lambda, as diffusers does for
    Karras sigmas), and t_of_lambda is its exact inverse. alpha^2 = sigmoid(2 lambda)."""

    def __init__(self, schedule: NoiseSchedule):
        self.num_timesteps = schedule.num_timesteps
        log_abar = np.log(schedule.alphas_cumprod.double().cpu().numpy())
        self.lambdas = 0.5 * log_abar - 0.5 * np.log(-np.expm1(log_abar))   # decreasing in t
        self.steps = np.arange(self.num_timesteps, dtype=np.float64)

    def lam(self, t: float) -> float:
        return float(np.interp(t, self.steps, self.lambdas))

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        lam = self.lam(t)
        return math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))

    def t_of_lambda(self, lam: float) -> float:
        # np.interp needs increasing x: lambda decreases with t
        return float(np.interp(lam, self.lambdas[::-1], self.steps[::-1]))


@dataclass
class _Solver:
    """What every solver shares: the schedule, how to read the network, the step grid."""

    schedule: NoiseSchedule
    num_steps: int = 10
    clip_x0: bool = True
    prediction_type: PredictionType = "epsilon"
    order: int = 2
    # Where sampling starts: the noisiest trained step, or later where lambda there is below this.
    # The cosine schedule's last steps reach lambda ~ -10 (sigma/alpha ~ 2e4); a grid that spans
    # them spends a few-step budget on pure noise (measured: dpm++2m-10 FID 49 -> see
    # docs/benchmarks.md). -5.1 is diffusers' recommended lambda_min_clipped for the cosine
    # schedule; the linear schedule ends at -5.06 and is unaffected.
    lambda_min: float = -5.1
    time_grid: bool = False   # see lambda_grid; each solver's default is the measured better one
    continuous: ContinuousSchedule = field(init=False, repr=False)

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"{type(self).__name__} needs num_steps >= 1, got {self.num_steps}")
        if self.order not in (1, 2):
            raise ValueError(f"{type(self).__name__} supports order 1 or 2, got {self.order}")
        if self.prediction_type not in ("epsilon", "x0", "v"):
            raise ValueError(f"unknown prediction_type '{self.prediction_type}'; choose epsilon, x0 or v")
        self.continuous = ContinuousSchedule(self.schedule)

    def data_prediction(self, model: ModelFn, x: Tensor, t: float) -> Tensor:
        """D(x, t): the network's x_0 estimate at (x, t), clipped to [-1, 1] when clip_x0."""
        alpha, sigma = self.continuous.alpha_sigma(t)
        output = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))
        if self.prediction_type == "epsilon":
            x0 = (x - sigma * output) / alpha
        elif self.prediction_type == "x0":
            x0 = output
        else:   # v = alpha eps - sigma x0  =>  x0 = alpha x - sigma v
            x0 = alpha * x - sigma * output
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def start(self, start_t: int | None) -> float:
        """The first timestep: `start_t` when given (denoising from x_t), else the noisiest trained
        step, moved to where lambda = lambda_min when the schedule goes below it."""
        if start_t is not None:
            return float(start_t)
        last = float(self.schedule.num_timesteps - 1)
        return last if self.continuous.lam(last) >= self.lambda_min else self.continuous.t_of_lambda(self.lambda_min)

    def lambda_grid(self, start_t: float, count: int) -> list[float]:
        """The `count` timesteps the network is evaluated at, from start_t down: uniform in lambda
        down to t = 0 (the DPM-Solver 'logSNR' grid), or with `time_grid` uniform in t down to
        start_t / count (diffusers' 'linspace'), the last evaluation's D being the sample."""
        if self.time_grid:
            return np.linspace(start_t, 0.0, count + 1)[:-1].tolist()
        lam_start, lam_end = self.continuous.lam(start_t), self.continuous.lam(0.0)
        return [start_t, *(self.continuous.t_of_lambda(lam) for lam in np.linspace(lam_start, lam_end, count)[1:])]

    def timesteps(self) -> list[int]:
        """The (rounded) timesteps the network is evaluated at, for display and progress bars."""
        return [round(t) for t in self.lambda_grid(self.start(None), self.num_steps)]

    @property
    def nfe(self) -> int:
        return self.num_steps

    def sample(self, model: ModelFn, x: Tensor, noise: NoiseFn, start_t: int | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> Tensor:
        raise NotImplementedError


@dataclass
class DPMSolverPP(_Solver):
    """DPM-Solver++ 2M (multistep, data prediction) or its SDE variant; 1st order at the first
    step and at the last (to sigma = 0), 2nd order in between."""

    sde: bool = False

    def __post_init__(self):
        super().__post_init__()
        # The SDE variant on a time-uniform grid (measured, docs/benchmarks.md section 7: FID 19.4
        # at 10 steps against 29.6 on the logSNR grid); the ODE variant is better on logSNR (36 vs 55).
        self.time_grid = self.sde

    def sample(self, model, x, noise, start_t=None, progress=None):
        grid = self.lambda_grid(self.start(start_t), self.num_steps)
        previous = None   # (D, h) of the step before
        indices = range(len(grid))
        for i in progress(indices) if progress else indices:
            t = grid[i]
            d = self.data_prediction(model, x, t)
            if i == len(grid) - 1:   # to sigma = 0: x_0 = D (h -> infinity)
                return d
            alpha_s, sigma_s = self.continuous.alpha_sigma(t)
            alpha_t, sigma_t = self.continuous.alpha_sigma(grid[i + 1])
            h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
            if previous is None or self.order == 1:
                d_prime, correction = d, torch.zeros_like(d)
            else:
                d_before, h_before = previous
                r = h_before / h
                d_prime, correction = d, (d - d_before) / r   # D' = D + correction / 2
            if self.sde:
                x = (sigma_t / sigma_s * math.exp(-h)) * x + alpha_t * -math.expm1(-2 * h) * (d_prime + 0.5 * correction) \
                    + sigma_t * math.sqrt(-math.expm1(-2 * h)) * noise()
            else:
                x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * (d_prime + 0.5 * correction)
            previous = (d, h)
        return x


@dataclass
class UniPC(_Solver):
    """UniPC with B(h) = e^-h - 1 (bh2), data prediction, predictor of `order` (1st at the first
    step and at the last, to sigma = 0), corrector UniC after every step that has a next network
    evaluation."""

    def sample(self, model, x, noise, start_t=None, progress=None):
        grid = self.lambda_grid(self.start(start_t), self.num_steps)
        lams = [self.continuous.lam(t) for t in grid]
        outputs: list[Tensor] = []   # D at the grid points so far
        last_x = last_order = None
        indices = range(len(grid))
        for i in progress(indices) if progress else indices:
            d = self.data_prediction(model, x, grid[i])
            if i == len(grid) - 1:
                # The final step to sigma = 0 returns D. No corrector here: a corrected x would need
                # another evaluation to change D, so diffusers skips it too.
                return d
            if last_x is not None:   # UniC: correct x_i with D_i, evaluated at the uncorrected x_i
                x = self._corrector(last_x, x, d, outputs, lams, i, last_order)
            outputs.append(d)
            order = 1 if i == 0 else self.order
            last_x, last_order = x, order
            x = self._predictor(x, outputs, lams, i, order)
        return x

    def _coefficients(self, lams, i):
        alpha_s, sigma_s = self.continuous.alpha_sigma(self.continuous.t_of_lambda(lams[i]))
        alpha_t, sigma_t = self.continuous.alpha_sigma(self.continuous.t_of_lambda(lams[i + 1]))
        h = lams[i + 1] - lams[i]
        return alpha_t, sigma_t / sigma_s, h, math.expm1(-h)   # B(h) = h_phi_1 = e^-h - 1

    def _predictor(self, x, outputs, lams, i, order):
        alpha_t, sigma_ratio, h, h_phi_1 = self._coefficients(lams, i)
        x_next = sigma_ratio * x - alpha_t * h_phi_1 * outputs[-1]
        if order == 2:   # rho = 1/2 with D1 = (D_{i-1} - D_i) / r_1, r_1 = (lambda_{i-1} - lambda_i) / h
            r1 = (lams[i - 1] - lams[i]) / h
            x_next = x_next - alpha_t * h_phi_1 * 0.5 * (outputs[-2] - outputs[-1]) / r1
        return x_next

    def _corrector(self, last_x, x, d_new, outputs, lams, i, order):
        """UniC from x_{i-1} (last_x) to x_i with D_i = d_new; `order` as the predictor used."""
        alpha_t, sigma_ratio, h, h_phi_1 = self._coefficients(lams, i - 1)
        hh = -h
        m0 = outputs[-1]
        x_t_ = sigma_ratio * last_x - alpha_t * h_phi_1 * m0
        d1_t = d_new - m0
        if order == 1:
            return x_t_ - alpha_t * h_phi_1 * 0.5 * d1_t
        # order 2: solve the 2x2 system R rho = b of the paper (rks = [r_1, 1])
        r1 = (lams[i - 2] - lams[i - 1]) / h
        d1 = (outputs[-2] - m0) / r1
        h_phi_k = h_phi_1 / hh - 1
        b = [h_phi_k * 1 / h_phi_1, (h_phi_k / hh - 1 / 2) * 2 / h_phi_1]
        rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array(b))
        return x_t_ - alpha_t * h_phi_1 * (rho[0] * d1 + rho[1] * d1_t)


@dataclass
class HeunKarras(_Solver):
    """Heun's 2nd-order method (EDM, deterministic) on Karras sigmas, rho = 7 (order 1: Euler)."""

    rho: float = 7.0

    @property
    def steps(self) -> int:
        return self.num_steps if self.order == 1 else (self.num_steps + 1) // 2   # Heun: NFE = 2 steps - 1

    @property
    def nfe(self) -> int:
        return self.steps if self.order == 1 else 2 * self.steps - 1

    def sigma_grid(self, start_t: float) -> list[float]:
        """Karras sigmas (s = sigma / alpha) from the start to t = 0, then 0."""
        s_max, s_min = self._s(start_t), self._s(0.0)
        ramp = np.linspace(0, 1, self.steps)
        sigmas = (s_max ** (1 / self.rho) + ramp * (s_min ** (1 / self.rho) - s_max ** (1 / self.rho))) ** self.rho
        return [*sigmas.tolist(), 0.0]

    def _s(self, t: float) -> float:
        alpha, sigma = self.continuous.alpha_sigma(t)
        return sigma / alpha

    def _t_of_s(self, s: float) -> float:
        return self.continuous.t_of_lambda(-math.log(s))   # s = sigma / alpha = e^-lambda

    def timesteps(self) -> list[int]:
        return [round(self._t_of_s(s)) for s in self.sigma_grid(self.start(None))[:-1]]

    def _denoise(self, model, x_ve: Tensor, s: float) -> Tensor:
        """D on the variance-exploding variable x_ve = x / alpha."""
        t = self._t_of_s(s)
        alpha, _ = self.continuous.alpha_sigma(t)
        return self.data_prediction(model, x_ve * alpha, t)

    def sample(self, model, x, noise, start_t=None, progress=None):
        sigmas = self.sigma_grid(self.start(start_t))
        alpha_start, _ = self.continuous.alpha_sigma(self._t_of_s(sigmas[0]))
        x = x / alpha_start
        indices = range(len(sigmas) - 1)
        for i in progress(indices) if progress else indices:
            s, s_next = sigmas[i], sigmas[i + 1]
            slope = (x - self._denoise(model, x, s)) / s
            x_euler = x + (s_next - s) * slope
            if s_next == 0 or self.order == 1:
                x = x_euler
                continue
            slope_next = (x_euler - self._denoise(model, x_euler, s_next)) / s_next
            x = x + (s_next - s) * 0.5 * (slope + slope_next)
        return x

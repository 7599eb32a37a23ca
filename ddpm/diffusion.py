"""The forward (noising) process in closed form and the training objective.

    q(x_t | x_0) = N(sqrt(alphas_cumprod_t) x_0, (1 - alphas_cumprod_t) I)
    x_t          = sqrt(alphas_cumprod_t) x_0 + sqrt(1 - alphas_cumprod_t) eps,  eps ~ N(0, I)

The network may predict eps (the paper's choice), x_0 itself, or the velocity
v = sqrt(alphas_cumprod_t) eps - sqrt(1 - alphas_cumprod_t) x_0 (Salimans & Ho 2022); the three
are interchangeable given x_t, and the helpers below convert between them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ddpm.schedules import BETA_SCHEDULES, NoiseSchedule, at_timesteps

Tensor = torch.Tensor
PredictionType = Literal["epsilon", "x0", "v"]
PREDICTION_TYPES = ("epsilon", "x0", "v")


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x_0) by reparameterisation (eq. 4): one step, whatever t is."""
    return (
        schedule.gather("sqrt_alphas_cumprod", t, x0) * x0
        + schedule.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )


def q_mean_variance(schedule: NoiseSchedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_t | x_0)."""
    mean = schedule.gather("sqrt_alphas_cumprod", t, x0) * x0
    variance = schedule.gather("one_minus_alphas_cumprod", t, x0).expand_as(x0)
    return mean, variance


def q_step(schedule: NoiseSchedule, x_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """One step of the Markov chain: x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
    return (
        schedule.gather("sqrt_alphas", t, x_prev) * x_prev
        + schedule.gather("sqrt_betas", t, x_prev) * noise
    )


def posterior_coefficients(abar_t, abar_prev):
    """q(x_prev | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance I), eqs. 6-7, for any two steps
    prev < t of the chain (consecutive, or a respaced pair) with alphas_cumprod abar_t, abar_prev:

        beta = 1 - abar_t / abar_prev                 (beta_t itself for consecutive steps)
        coef_x0 = sqrt(abar_prev) beta / (1 - abar_t)
        coef_xt = sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t)
        variance = beta (1 - abar_prev) / (1 - abar_t)   (beta-tilde; 0 at the first step)

    Floats or tensors alike. Returns (coef_x0, coef_xt, variance, beta).
    """
    beta = 1 - abar_t / abar_prev
    coef_x0 = abar_prev**0.5 * beta / (1 - abar_t)
    coef_xt = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    return coef_x0, coef_xt, beta * (1 - abar_prev) / (1 - abar_t), beta


def q_posterior(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance (beta-tilde) of q(x_{t-1} | x_t, x_0), eqs. 6-7."""
    # in the schedule's float64, then cast: 1 - abar_t / abar_prev loses small betas in float32
    coefficients = posterior_coefficients(schedule.alphas_cumprod, schedule.alphas_cumprod_prev)
    coef_x0, coef_xt, variance = (at_timesteps(c, t, x_t) for c in coefficients[:3])
    return coef_x0 * x0 + coef_xt * x_t, variance


# --- conversions between what the network predicts -----------------------------------------

def x0_from_epsilon(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_0 = (x_t - sqrt(1 - alphas_cumprod) eps) / sqrt(alphas_cumprod)."""
    return (
        schedule.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        - schedule.gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
    )


def epsilon_from_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alphas_cumprod) x_0) / sqrt(1 - alphas_cumprod)."""
    return (
        schedule.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0
    ) / schedule.gather("sqrt_recipm1_alphas_cumprod", t, x_t)


def velocity(schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """v = sqrt(alphas_cumprod) eps - sqrt(1 - alphas_cumprod) x_0."""
    return (
        schedule.gather("sqrt_alphas_cumprod", t, x0) * eps
        - schedule.gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0
    )


def x0_from_velocity(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x_0 = sqrt(alphas_cumprod) x_t - sqrt(1 - alphas_cumprod) v."""
    return (
        schedule.gather("sqrt_alphas_cumprod", t, x_t) * x_t
        - schedule.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * v
    )


def predict_x0_and_epsilon(
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    model_output: Tensor,
    prediction_type: PredictionType = "epsilon",
    clip_x0: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both x_0 and eps implied by the network's output at (x_t, t).

    With `clip_x0`, x_0 is clipped to the data range [-1, 1] and eps is recomputed from the
    clipped x_0, so the pair stays consistent with x_t (a DDIM step that mixes a clipped x_0
    with the raw eps drifts off the data: the pitfall of samplers that clip x_0 but step with
    the network's own eps).
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = x0_from_epsilon(schedule, x_t, t, eps)
    elif prediction_type == "x0":
        x0 = model_output
        eps = epsilon_from_x0(schedule, x_t, t, x0)
    elif prediction_type == "v":
        x0 = x0_from_velocity(schedule, x_t, t, model_output)
        eps = epsilon_from_x0(schedule, x_t, t, x0)
    else:
        raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of {PREDICTION_TYPES}")
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = epsilon_from_x0(schedule, x_t, t, x0)
    return x0, eps


def training_target(
    schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, prediction_type: PredictionType
) -> Tensor:
    """What the network is trained to output at (x_t, t)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return velocity(schedule, x0, t, noise)
    raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of {PREDICTION_TYPES}")


def training_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    min_snr_gamma: float | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Algorithm 1: t ~ Uniform{1..T}, eps ~ N(0, I), loss = || target - model(x_t, t) ||^2.

    The mean squared error over all pixels and the batch (the paper's 'simple' objective). With
    `min_snr_gamma` (Hang et al. 2023, Min-SNR-gamma), each image's error is weighted by
    w(t) = min(SNR(t), gamma) / SNR(t) for eps-prediction, min(SNR(t), gamma) / (SNR(t) + 1) for v,
    min(SNR(t), gamma) for x0: the same clipped-SNR weight on the x0 error for every target, so the
    nearly clean steps (huge SNR) stop dominating the gradient.
    Randomness comes from `generator` when given, so a training step is reproducible; `t` and
    `noise`, when given, are used as drawn (the trainer draws them for a whole global batch and
    hands each micro-batch its slice). `class_labels` go to a class-conditional model as they
    are (the trainer has already replaced the dropped ones by the null class).
    """
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    prediction = model(x_t, t) if class_labels is None else model(x_t, t, class_labels)
    target = training_target(schedule, x0, t, noise, prediction_type)
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (min_snr_weight(schedule, t, prediction_type, min_snr_gamma) * per_image).mean()


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, prediction_type: PredictionType, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight of timesteps t for a network predicting `prediction_type` (float32)."""
    snr = schedule.signal_to_noise().to(t.device)[t]
    clipped = snr.clamp(max=gamma)
    weight = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction_type]
    return weight.float()


class DiffusionConfig(BaseModel):
    """The diffusion process a model is trained for: its noise schedule and what it predicts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: str = Field("linear", description=f"one of {sorted(BETA_SCHEDULES)}")
    num_timesteps: int = Field(1000, ge=1, description="T, the number of diffusion steps")
    prediction_type: PredictionType = "epsilon"
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (5 in the paper); "
                                                                "None: the paper's unweighted MSE")

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown noise schedule '{name}'; choose one of {sorted(BETA_SCHEDULES)}")
        return name

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.num_timesteps)

"""The forward process in closed form and the training objective."""

import pytest
import torch

from ddpm.diffusion import (
    DiffusionConfig,
    epsilon_from_x0,
    predict_x0_and_epsilon,
    q_mean_variance,
    q_posterior,
    q_sample,
    q_step,
    training_loss,
    velocity,
    x0_from_epsilon,
    x0_from_velocity,
)
from ddpm.schedules import NoiseSchedule


def test_closed_form_matches_iterated_one_step_noising():
    """x_t from eq. 4 in one jump has the same mean and variance as t steps of q(x_s | x_{s-1})."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    torch.manual_seed(0)
    x0 = torch.tensor([0.8, -0.5, 0.0, 0.3], dtype=torch.float64).repeat(20_000, 1)  # 20k chains, 4 pixels
    t_final = 300
    x = x0.clone()
    for t in range(t_final + 1):
        x = q_step(schedule, x, torch.full((x.shape[0],), t), torch.randn_like(x))
    jump = q_sample(schedule, x0, torch.full((x0.shape[0],), t_final), torch.randn_like(x0))
    mean, variance = q_mean_variance(schedule, x0[:1], torch.tensor([t_final]))
    # statistical tolerance: standard error of a mean over 20k draws is ~0.007
    for draws in (x, jump):
        assert torch.allclose(draws.mean(0), mean[0], atol=0.03)
        assert torch.allclose(draws.var(0), variance[0], rtol=0.05)
    assert torch.allclose(x.mean(0), jump.mean(0), atol=0.04)


def test_posterior_is_consistent_with_the_forward_process():
    """E over x_t of the posterior mean recovers E[x_{t-1} | x_0]: the posterior is Bayes-consistent."""
    schedule = NoiseSchedule.from_name("cosine", 100)
    x0 = torch.full((50_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((x0.shape[0],), 40)
    x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    mean, variance = q_posterior(schedule, x0, x_t, t)
    x_prev = mean + variance.sqrt() * torch.randn_like(x0)
    expected_mean, expected_var = q_mean_variance(schedule, x0[:1], torch.tensor([39]))
    assert abs(x_prev.mean() - expected_mean[0, 0]) < 0.01
    assert abs(x_prev.var() - expected_var[0, 0]) < 0.02 * expected_var[0, 0] + 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_prediction_types_convert_exactly(prediction_type):
    schedule = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = q_sample(schedule, x0, t, eps)
    output = {"epsilon": eps, "x0": x0, "v": velocity(schedule, x0, t, eps)}[prediction_type]
    x0_hat, eps_hat = predict_x0_and_epsilon(schedule, x_t, t, output, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, eps, atol=1e-6)
    assert torch.allclose(x0_from_epsilon(schedule, x_t, t, eps), x0, atol=1e-8)
    assert torch.allclose(epsilon_from_x0(schedule, x_t, t, x0), eps, atol=1e-6)
    assert torch.allclose(x0_from_velocity(schedule, x_t, t, velocity(schedule, x0, t, eps)), x0, atol=1e-10)


def test_clipping_recomputes_epsilon_from_the_clipped_x0():
    schedule = NoiseSchedule.from_name("linear", 1000)
    x_t, t = torch.full((1, 1, 2, 2), 3.0), torch.tensor([10])
    x0, eps = predict_x0_and_epsilon(schedule, x_t, t, torch.zeros_like(x_t), "epsilon", clip_x0=True)
    assert x0.max() == 1.0
    # consistent: x_t is again sqrt(abar) x0 + sqrt(1 - abar) eps
    assert torch.allclose(q_sample(schedule, x0, t, eps), x_t, atol=1e-5)


class Oracle(torch.nn.Module):
    """Predicts the noise exactly from (x_t, t) for a known x0: loss must be 0."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, x_t, t):
        return epsilon_from_x0(self.schedule, x_t, t, self.x0)


def test_training_loss_is_mse_and_reproducible():
    schedule = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    assert training_loss(Oracle(schedule, x0), schedule, x0) < 1e-6
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    losses = [training_loss(zero, schedule, x0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert losses[0] == losses[1]
    # predicting 0 for N(0, 1) noise costs E[eps^2] = 1
    assert abs(training_loss(zero, schedule, torch.zeros(256, 1, 16, 16)) - 1.0) < 0.02


def test_diffusion_config_validation():
    assert DiffusionConfig(schedule="cosine", num_timesteps=10).make_schedule().num_timesteps == 10
    with pytest.raises(ValueError, match="unknown noise schedule 'foo'"):
        DiffusionConfig(schedule="foo")
    with pytest.raises(ValueError, match="num_timesteps"):
        DiffusionConfig(num_timesteps=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionConfig(prediction_type="score")


def test_min_snr_gamma_weights_are_the_clipped_snr_for_each_target():
    from ddpm.diffusion import DiffusionConfig, min_snr_weight, training_loss

    schedule = NoiseSchedule.from_name("linear", 1000)
    t = torch.tensor([0, 100, 500, 999])
    snr = schedule.signal_to_noise()[t]
    clipped = snr.clamp(max=5.0)
    assert torch.allclose(min_snr_weight(schedule, t, "epsilon", 5.0).double(), clipped / snr, rtol=1e-6)
    assert torch.allclose(min_snr_weight(schedule, t, "v", 5.0).double(), clipped / (snr + 1), rtol=1e-6)
    assert torch.allclose(min_snr_weight(schedule, t, "x0", 5.0).double(), clipped, rtol=1e-6)
    # eps: high-SNR (nearly clean) steps are weighted down, noisy steps (SNR < gamma) keep weight 1
    weights = min_snr_weight(schedule, t, "epsilon", 5.0)
    assert weights[0] < 1e-3 and weights[-1] == 1.0

    model = lambda x, t: x * 0.5  # noqa: E731 (any deterministic network)
    x0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = training_loss(model, schedule, x0, t=t, noise=noise)
    # gamma above every SNR: weight 1 for eps, the plain MSE
    assert torch.allclose(training_loss(model, schedule, x0, t=t, noise=noise, min_snr_gamma=1e9), plain)
    weighted = training_loss(model, schedule, x0, t=t, noise=noise, min_snr_gamma=5.0)
    x_t = schedule.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1) * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t].float().reshape(-1, 1, 1, 1) * noise
    errors = (model(x_t, t) - noise).pow(2).flatten(1).mean(1)
    assert torch.allclose(weighted, (weights * errors).mean(), rtol=1e-5)
    assert DiffusionConfig().min_snr_gamma is None and DiffusionConfig(min_snr_gamma=5).min_snr_gamma == 5

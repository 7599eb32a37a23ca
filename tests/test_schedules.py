"""Noise schedules against the published formulas, computed independently in float64 numpy."""

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import posterior_coefficients
from ddpm.schedules import BETA_SCHEDULES, NoiseSchedule


def test_linear_matches_ddpm_paper():
    schedule = NoiseSchedule.from_name("linear", 1000)
    expected = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    np.testing.assert_allclose(schedule.betas.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-6)
    # the paper's figure: alpha-bar at T is ~4e-5, i.e. x_T is almost pure noise
    assert 3e-5 < float(schedule.alphas_cumprod[-1]) < 5e-5


def test_cosine_matches_improved_ddpm():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    schedule = NoiseSchedule.from_name("cosine", T)
    np.testing.assert_allclose(schedule.betas.numpy(), expected, atol=1e-6)
    alphas_cumprod = np.cumprod(1 - expected)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), alphas_cumprod, atol=1e-6)
    # away from the clipped end, alpha-bar is f(t)/f(0) itself
    np.testing.assert_allclose(alphas_cumprod[:900], [f(t + 1) / f(0) for t in range(900)], atol=1e-6)


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_every_schedule_is_valid_for_any_T(name, T):
    schedule = NoiseSchedule.from_name(name, T)
    assert schedule.num_timesteps == T
    assert ((schedule.betas > 0) & (schedule.betas < 1)).all()
    assert (schedule.alphas_cumprod[1:] <= schedule.alphas_cumprod[:-1]).all()  # monotone decreasing
    _, _, variance, _ = posterior_coefficients(schedule.alphas_cumprod, schedule.alphas_cumprod_prev)
    assert torch.isfinite(variance).all() and variance[0] == 0


def test_posterior_quantities_match_eq_7():
    """For consecutive steps the pairwise posterior is the paper's eq. 7 with beta_t itself."""
    s = NoiseSchedule.from_name("linear", 1000)
    t = 500
    abar, abar_prev, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    coef_x0, coef_xt, variance, pair_beta = posterior_coefficients(float(abar), float(abar_prev))
    assert math.isclose(pair_beta, beta, rel_tol=1e-9)
    assert math.isclose(variance, beta * (1 - abar_prev) / (1 - abar), rel_tol=1e-9)
    assert math.isclose(coef_x0, abar_prev.sqrt() * beta / (1 - abar), rel_tol=1e-9)
    assert math.isclose(coef_xt, (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar), rel_tol=1e-9)
    assert posterior_coefficients(float(s.alphas_cumprod[0]), 1.0)[2] == 0


def test_custom_betas_and_errors():
    s = NoiseSchedule([0.1, 0.2, 0.3])
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), [0.9, 0.72, 0.504])
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
        NoiseSchedule.from_name("cosin")
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\)"):
        NoiseSchedule([0.1, 1.5])
    with pytest.raises(ValueError, match="at least one value"):
        NoiseSchedule([])
    with pytest.raises(ValueError, match="num_timesteps must be an integer >= 1"):
        NoiseSchedule.from_name("linear", 0)


def test_gather_broadcasts_in_the_batch_dtype():
    s = NoiseSchedule.from_name("linear", 10)
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float32)
    values = s.gather("alphas_cumprod", torch.tensor([0, 5, 9]), x)
    assert values.shape == (3, 1, 1, 1) and values.dtype == torch.float32
    assert torch.allclose(values.flatten(), s.alphas_cumprod[[0, 5, 9]].float())

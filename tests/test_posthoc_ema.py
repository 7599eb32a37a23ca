"""Post-hoc EMA (EDM2): the width <-> exponent map, the power-function EMA against its closed form,
reconstruction against closed forms and against a directly tracked EMA, bad widths in one line,
and snapshots under exact resume."""

import numpy as np
import pytest
import torch

from ddpm.checkpoint import file_sha256, list_checkpoints, load_checkpoint
from ddpm.posthoc_ema import (MAX_SIGMA_REL, PosthocEMAError, PowerEMA, fixed_ema_sigma_rel, gamma_to_sigma_rel,
                              list_snapshots, posthoc_checkpoint, reconstruct, sigma_rel_to_gamma, snapshot_dir,
                              solve_coefficients)
from ddpm.training import TrainConfig
from test_training import assert_equal_states, config, make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Vector(torch.nn.Module):
    """A model that is one weight vector: its trajectory is whatever the test sets."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size))


def track(trajectory: np.ndarray, sigma_rels, out_dir=None, every: int = 0) -> tuple[PowerEMA, Vector]:
    """Run PowerEMA over `trajectory` (steps x size, row t-1 is the weights after step t), saving a
    snapshot every `every` steps into `out_dir`."""
    model = Vector(trajectory.shape[1])
    ema = None
    for t, weights in enumerate(trajectory, start=1):
        model.weight.data = torch.as_tensor(weights, dtype=torch.float32)
        if ema is None:
            ema = PowerEMA(model, sigma_rels)
        ema.update(model, t)
        if out_dir is not None and (t % every == 0 or t == len(trajectory)):
            ema.save_snapshot(snapshot_dir(out_dir), t, {})
    return ema, model


def test_sigma_rel_and_gamma_are_inverse_and_edm2s_values_hold():
    for sigma_rel in (0.01, 0.05, 0.10, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)   # EDM2 section 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.5):
        with pytest.raises(PosthocEMAError, match="outside"):
            sigma_rel_to_gamma(bad)


def test_the_trainers_fixed_ema_has_the_width_its_decays_give():
    """Long runs: decay d averages over sqrt(d)/(1-d) steps. Short runs with the warm-up never reach
    d: their decay 1 - 9/(10+n) is a power-function EMA with gamma 8 (sigma_rel 0.0905)."""
    assert fixed_ema_sigma_rel(0.99, 100_000, warmup=False) == pytest.approx(np.sqrt(0.99) / 0.01 / 100_000, rel=1e-3)
    assert fixed_ema_sigma_rel(0.999, 5000) == pytest.approx(gamma_to_sigma_rel(8.0), abs=1e-3)


def test_the_discrete_power_ema_follows_its_closed_form():
    """Weights growing linearly, theta(t) = t: the continuous profile averages to (gamma+1)/(gamma+2) t;
    the discrete update's average of 1..t is within 1/t of it. Constant weights stay constant."""
    steps = 4000
    ema, _ = track(np.arange(1, steps + 1, dtype=np.float64)[:, None], (0.05, 0.10))
    for gamma, average in zip(ema.gammas, ema.averages):
        assert float(average[0][0]) / steps == pytest.approx((gamma + 1) / (gamma + 2), abs=2e-3)
    constant, _ = track(np.full((50, 3), 0.25), (0.05, 0.10))
    assert all(torch.equal(a[0], torch.full((3,), 0.25)) for a in constant.averages)


def test_coefficients_sum_to_one_and_a_tracked_width_is_its_own_snapshot(tmp_path):
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.standard_normal((600, 40)), axis=0)
    ema, _ = track(trajectory, (0.05, 0.10), tmp_path, every=30)
    for sigma_rel, average in zip(ema.sigma_rels, ema.averages):
        weights, info = reconstruct(tmp_path, sigma_rel)
        assert sum(info["coefficients"]) == pytest.approx(1.0, abs=1e-12)
        assert info["profile_error"] < 1e-6
        torch.testing.assert_close(weights["weight"], average[0], rtol=0, atol=1e-5)
    x, error = solve_coefficients([100, 200, 300] * 2, [6.94] * 3 + [16.97] * 3, 300.0, 10.0)
    assert x.sum() == pytest.approx(1.0) and 0 <= error < 0.05


def test_a_width_between_the_tracked_ones_matches_a_directly_tracked_ema(tmp_path):
    """Tracked 0.05 and 0.10, 20 snapshots: the reconstructed 0.07 and 0.15 (outside, still in range)
    differ from directly tracked EMAs of those widths by under 0.5% of how far those EMAs are from
    the raw weights (the part of the weights that averaging changes; measured 0.02% and 0.05%)."""
    rng = np.random.default_rng(1)
    steps = 2000
    drift = np.linspace(0, 1, steps)[:, None] * rng.standard_normal(64)   # a trend the EMA lags behind
    trajectory = drift + 0.3 * np.cumsum(rng.standard_normal((steps, 64)), axis=0) / np.sqrt(steps)
    track(trajectory, (0.05, 0.10), tmp_path, every=steps // 20)
    for target in (0.07, 0.15):
        direct, _ = track(trajectory, (target, 0.2))
        weights, info = reconstruct(tmp_path, target)
        truth = direct.averages[0][0].double()
        lag = (truth - torch.as_tensor(trajectory[-1])).norm()
        assert float((weights["weight"].double() - truth).norm() / lag) < 0.005, (target, info["profile_error"])


def test_widths_the_snapshots_cannot_reconstruct_are_one_line_with_the_range(tmp_path):
    track(np.random.default_rng(2).standard_normal((200, 4)), (0.05, 0.10), tmp_path, every=100)  # two snapshots
    with pytest.raises(PosthocEMAError) as error:
        reconstruct(tmp_path, 0.01)
    message = str(error.value)
    assert "\n" not in message and "cannot be reconstructed" in message and "choose sigma_rel within [" in message
    with pytest.raises(PosthocEMAError, match="outside"):
        reconstruct(tmp_path, 0.3)
    with pytest.raises(PosthocEMAError, match=r"no post-hoc EMA snapshot at step 150; snapshots: \[100, 200\]"):
        reconstruct(tmp_path, 0.05, step=150)
    with pytest.raises(PosthocEMAError, match="no post-hoc EMA snapshots in"):
        reconstruct(tmp_path / "elsewhere", 0.05)
    with pytest.raises(ValueError, match="outside"):
        TrainConfig(posthoc_ema=True, posthoc_ema_sigma_rels=(0.05, 0.4))
    with pytest.raises(ValueError, match="repeats a width"):
        TrainConfig(posthoc_ema=True, posthoc_ema_sigma_rels=(0.05, 0.05))


def test_snapshots_are_checkpoints_that_resume_bit_for_bit_and_reconstruct_into_a_sampleable_checkpoint(tmp_path):
    """8 steps straight == 5 steps, a checkpoint at 4, a kill (a snapshot of step 5 left behind),
    then a resume: the same snapshots, byte for byte, and the same running EMAs."""
    cfg = config(steps=8, checkpoint_every=4, posthoc_ema=True, posthoc_ema_snapshots=8)
    assert cfg.posthoc_ema_every == 1
    straight = make_trainer(cfg, tmp_path / "straight")
    straight.train(progress=False)
    split = make_trainer(cfg, tmp_path / "split")
    split.train(progress=False, stop_at=5)   # snapshot 5 written, checkpoint 4 the newest
    assert [p.name for p in list_checkpoints(tmp_path / "split")][-1] == "step-0000004.pt"
    resumed = make_trainer(cfg, tmp_path / "split")
    assert resumed.train(progress=False).resumed_from == 4
    assert_equal_states(resumed.state_dict()["posthoc_ema"], straight.state_dict()["posthoc_ema"])
    ours, theirs = list_snapshots(tmp_path / "split"), list_snapshots(tmp_path / "straight")
    assert [p.name for p in ours] == [f"step-{s:07d}.pt" for s in range(1, 9)] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        assert file_sha256(a) == file_sha256(b), a.name   # verified (sha256 sidecar) and identical

    path, info = posthoc_checkpoint(tmp_path / "split", 0.08, tmp_path / "reconstructed")
    state = load_checkpoint(path)
    assert state["step"] == 8 and state["posthoc_ema"]["sigma_rel"] == 0.08
    from ddpm.checkpoint import load_model
    model, _, _ = load_model(path)   # samples like any checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(Exception, match="posthoc_ema False -> True"):   # cannot be switched on mid-run
        make_trainer(config(steps=8, checkpoint_every=4), tmp_path / "off").train(progress=False, stop_at=4)
        make_trainer(config(steps=10, checkpoint_every=4, posthoc_ema=True), tmp_path / "off").train(progress=False)

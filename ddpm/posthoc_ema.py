"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C): choose the EMA length after training.

Training keeps a few *power-function* EMAs of the weights and saves snapshots of them; afterwards
the EMA of any other length, at any saved time, is a weighted sum of the snapshots.

A power-function EMA with exponent gamma averages the weights theta(tau) over the whole run with
the profile p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1), 0 <= tau <= t:

    theta_gamma(t) = integral_0^t p_{t,gamma}(tau) theta(tau) dtau,

whose discrete update is (EDM2 eq. 3)

    theta_gamma(t) = beta_gamma(t) theta_gamma(t - 1) + (1 - beta_gamma(t)) theta(t),
    beta_gamma(t)  = (1 - 1/t)^(gamma + 1)                  (t = 1, 2, ...: optimizer steps done).

Its width relative to the run's length, sigma_rel (the profile's standard deviation over t), is
(EDM2 eq. 2, Algorithm 2 inverts it: the largest real root of a cubic)

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

A profile of every EMA is a function of tau, so the EMA at (t_r, gamma_r) is approximated by the
snapshots (t_i, gamma_i) whose profiles best fit its own in L2 (EDM2 appendix C.3, Algorithm 3):

    A_ij = <p_i, p_j>, b_i = <p_i, p_r>, A x = b, x <- x / sum(x),  theta_r ~= sum_i x_i theta_i,

with <p_{ta,ga}, p_{tb,gb}> = (ga + 1)(gb + 1) (ta/tb)^e / ((ga + gb + 1) max(ta, tb)),
e = gb if ta < tb else -ga. The relative L2 error of that fit, ||sum_i x_i p_i - p_r|| / ||p_r||,
says how far a width can be from the tracked ones: reconstruct() refuses one that misses its
profile by more than MAX_PROFILE_ERROR.

ema-pytorch's PostHocEMA implements the same equations, but writes its own snapshot files on its
own schedule (torch.save, float16 by default, no checksum) outside the checkpoints that exact
resume restores; here the snapshots are checkpoints (ddpm.checkpoint: atomic, sha256, weights_only)
and the running EMAs live in the trainer's state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.checkpoint import CheckpointError, checkpoint_step, list_checkpoints, load_checkpoint, save_checkpoint

Tensor = torch.Tensor

SNAPSHOT_FOLDER = "posthoc-ema"   # under a run's checkpoint folder: step-XXXXXXX.pt, one per snapshot
# sigma_rel >= this has gamma <= 0 (a profile that no longer rises towards t): outside EDM2's family
MAX_SIGMA_REL = float(np.sqrt(1 / 12))
# a reconstruction whose profile misses the asked one by more than this (relative L2) is refused
MAX_PROFILE_ERROR = 0.05


class PosthocEMAError(ValueError):
    """A width or time that the snapshots cannot reconstruct, or snapshots that do not fit together."""


# --- widths -----------------------------------------------------------------------------------


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma of the power-function EMA of relative width `sigma_rel` (EDM2 Algorithm 2)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise PosthocEMAError(f"sigma_rel {sigma_rel:g} is outside (0, {MAX_SIGMA_REL:.4f}): a power-function EMA "
                              "is at most as wide as a plain average of the whole run (sigma_rel 0.2887)")
    t = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function EMA with exponent `gamma` (EDM2 eq. 2)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def fixed_ema_sigma_rel(decay: float, step: int, warmup: bool = True) -> float:
    """The relative width at `step` of the trainer's classic EMA (ddpm.training: the first update
    copies, then decay min(decay, (1+n)/(10+n)) with `warmup`), from its exact averaging weights
    over the run. With the warm-up, a run shorter than ~9,000 steps never reaches 0.999: its
    decay 1 - 9/(10+n) is itself close to a power-function EMA with gamma ~8 (sigma_rel ~0.09)."""
    n = np.arange(step, dtype=np.float64)
    decays = np.minimum(decay, (1 + n) / (10 + n)) if warmup else np.full(step, decay)
    decays[0] = 0.0   # AveragedModel's first update is a copy
    # weight of update k at the end: (1 - d_k) * prod_{j > k} d_j
    with np.errstate(divide="ignore"):
        log_after = np.concatenate([np.cumsum(np.log(decays[::-1]))[::-1][1:], [0.0]])
    weights = (1 - decays) * np.exp(log_after)
    times = n + 1
    mean = float((weights * times).sum() / weights.sum())
    return float(np.sqrt((weights * (times - mean) ** 2).sum() / weights.sum()) / step)


def beta(t: int, gamma: float) -> float:
    """The decay of the update at step t >= 1: (1 - 1/t)^(gamma + 1); 0 at t = 1 (a copy)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


# --- the running EMAs (training) ---------------------------------------------------------------


class PowerEMA:
    """Power-function EMAs of a model's floating-point state (parameters and buffers), one per
    width in `sigma_rels`, updated after every optimizer step with update(model, t)."""

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...]):
        if len(sigma_rels) < 2 or len(set(sigma_rels)) != len(sigma_rels):
            raise PosthocEMAError(f"post-hoc EMA tracks at least two distinct widths, got {tuple(sigma_rels)}")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        state = model.state_dict()
        self.names = [name for name, value in state.items() if value.is_floating_point()]
        self.averages = [[state[name].detach().clone() for name in self.names] for _ in self.gammas]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        """Fold in the weights after optimizer step `t` (1-based)."""
        state = model.state_dict()
        current = [state[name].detach() for name in self.names]
        for gamma, average in zip(self.gammas, self.averages):
            torch._foreach_lerp_(average, current, 1.0 - beta(t, gamma))

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels),
                "averages": [dict(zip(self.names, average)) for average in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise CheckpointError(f"the checkpoint tracks post-hoc EMA widths {tuple(state['sigma_rels'])}, "
                                  f"this run {self.sigma_rels}")
        self.averages = [[stored[name].to(average[0].device) for name in self.names]
                         for stored, average in zip(state["averages"], self.averages)]

    def snapshot_bytes(self) -> int:
        """The size of one snapshot on disk (every width, float32 as trained)."""
        return sum(t.numel() * t.element_size() for average in self.averages for t in average)

    def save_snapshot(self, directory: Path, step: int, model_state: dict) -> Path:
        """Write the EMAs at `step` as `directory`/step-XXXXXXX.pt (a checkpoint: atomic, sha256).
        `model_state` adds what makes the file self-describing (model and diffusion config)."""
        state = {"step": step, "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas),
                 "averages": [{name: t.detach().cpu() for name, t in zip(self.names, average)}
                              for average in self.averages],
                 **model_state}
        return save_checkpoint(state, directory, step)


def snapshot_dir(checkpoint_dir: Path | str) -> Path:
    return Path(checkpoint_dir) / SNAPSHOT_FOLDER


def drop_snapshots_after(checkpoint_dir: Path | str, step: int) -> list[Path]:
    """Remove the snapshots newer than `step` (written after the checkpoint a run resumes from:
    the resumed run writes them again, bit for bit); returns what it removed."""
    removed = []
    for path in list_checkpoints(snapshot_dir(checkpoint_dir)):
        if checkpoint_step(path) > step:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            removed.append(path)
    return removed


# --- reconstruction (after training) -----------------------------------------------------------


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}>: the inner products of power-function EMA profiles
    (EDM2 Algorithm 3's p_dot_p), broadcast."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(t_in, gamma_in, t_out: float, gamma_out: float) -> tuple[np.ndarray, float]:
    """(x, error): the weights of the snapshots (t_in, gamma_in) whose sum best approximates the EMA
    (t_out, gamma_out) (least squares in profile space, normalised to sum to one), and the relative
    L2 error of the approximated profile."""
    t_in, gamma_in = (np.asarray(v, np.float64).reshape(-1) for v in (t_in, gamma_in))
    A = profile_dot(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])
    b = profile_dot(t_in, gamma_in, np.float64(t_out), np.float64(gamma_out))
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()
    norm2 = profile_dot(np.float64(t_out), np.float64(gamma_out), np.float64(t_out), np.float64(gamma_out))
    error2 = norm2 - 2 * x @ b + x @ A @ x
    return x, float(np.sqrt(max(error2, 0.0) / norm2))


def list_snapshots(checkpoint_dir: Path | str) -> list[Path]:
    """The snapshot files of a run, oldest first."""
    return list_checkpoints(snapshot_dir(checkpoint_dir))


def snapshot_steps(checkpoint_dir: Path | str) -> list[int]:
    return [checkpoint_step(p) for p in list_snapshots(checkpoint_dir)]


def reconstruct(checkpoint_dir: Path | str, sigma_rel: float, step: int | None = None,
                max_error: float = MAX_PROFILE_ERROR) -> tuple[dict[str, Tensor], dict]:
    """The weights of the power-function EMA of width `sigma_rel` at snapshot `step` (default: the
    last), from the run's snapshots up to that step; and what was used ({step, sigma_rel, gamma,
    profile_error, coefficients}). PosthocEMAError when there are no snapshots, `step` is not one,
    or the width cannot be reconstructed from them within `max_error`."""
    weights, info, _ = _reconstruct(checkpoint_dir, sigma_rel, step, max_error)
    return weights, info


def _reconstruct(checkpoint_dir, sigma_rel, step, max_error) -> tuple[dict[str, Tensor], dict, dict]:
    """reconstruct(), and the snapshot at `step` itself (its configs describe the result)."""
    paths = list_snapshots(checkpoint_dir)
    if not paths:
        raise PosthocEMAError(f"no post-hoc EMA snapshots in {snapshot_dir(checkpoint_dir)}; train with "
                              "train.posthoc_ema=true to keep them")
    steps = [checkpoint_step(p) for p in paths]
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise PosthocEMAError(f"no post-hoc EMA snapshot at step {step}; snapshots: {steps}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    used = [p for p, s in zip(paths, steps) if s <= step]
    first = load_checkpoint(used[0])
    tracked = first["gammas"]
    t_in = np.repeat([float(s) for s in steps if s <= step], len(tracked))
    gamma_in = np.tile(tracked, len(used))
    x, error = solve_coefficients(t_in, gamma_in, float(step), gamma)
    if error > max_error:
        low, high = reconstructible_range(steps[: len(used)], tracked, max_error)
        raise PosthocEMAError(
            f"sigma_rel {sigma_rel:g} at step {step} cannot be reconstructed from the snapshots of widths "
            f"{', '.join(f'{s:g}' for s in first['sigma_rels'])}: the fit misses its averaging profile by "
            f"{error:.0%} (at most {max_error:.0%}); choose sigma_rel within [{low:.3g}, {high:.3g}]")
    weights: dict[str, Tensor] | None = None
    coefficients = iter(x)
    for k, path in enumerate(used):
        state = first if k == 0 else load_checkpoint(path)
        if state["gammas"] != tracked:
            raise PosthocEMAError(f"snapshot {path} tracks other widths than {used[0].name}: not one run's snapshots")
        for average in state["averages"]:
            c = float(next(coefficients))
            if weights is None:
                weights = {name: t.double() * c for name, t in average.items()}
            else:
                for name, t in average.items():
                    weights[name].add_(t.double(), alpha=c)
    dtypes = {name: t.dtype for name, t in first["averages"][0].items()}
    return ({name: t.to(dtypes[name]) for name, t in weights.items()},
            {"step": step, "sigma_rel": float(sigma_rel), "gamma": gamma, "profile_error": error,
             "coefficients": [float(c) for c in x]}, state)


def reconstructible_range(steps: list[int], gammas: list[float], max_error: float = MAX_PROFILE_ERROR,
                          grid: int = 200) -> tuple[float, float]:
    """The widths (sigma_rel) at the last of `steps` that snapshots of `gammas` at `steps`
    reconstruct within `max_error` (scanned on a log grid; NaN, NaN when none)."""
    t_in = np.repeat(np.asarray(steps, np.float64), len(gammas))
    gamma_in = np.tile(np.asarray(gammas, np.float64), len(steps))
    candidates = np.geomspace(0.005, MAX_SIGMA_REL * 0.999, grid)
    good = [s for s in candidates if solve_coefficients(t_in, gamma_in, float(steps[-1]), sigma_rel_to_gamma(s))[1]
            <= max_error]
    return (float(min(good)), float(max(good))) if good else (float("nan"), float("nan"))


def posthoc_checkpoint(checkpoint_dir: Path | str, sigma_rel: float, out_dir: Path | str,
                       step: int | None = None) -> tuple[Path, dict]:
    """Write the reconstruction as a checkpoint (`out_dir`/step-XXXXXXX.pt) that samples like any
    other: its "ema" is the reconstructed weights (in AveragedModel's layout) and it holds the run's
    configuration; plus a "posthoc_ema" entry saying how it was made."""
    weights, info, snapshot = _reconstruct(checkpoint_dir, sigma_rel, step, MAX_PROFILE_ERROR)
    state = {"step": info["step"], "model": weights,
             "ema": {**{f"module.{name}": t for name, t in weights.items()}, "n_averaged": torch.tensor(info["step"])},
             "model_config": snapshot["model_config"], "diffusion_config": snapshot["diffusion_config"],
             "posthoc_ema": {k: v for k, v in info.items() if k != "coefficients"}}
    if "train_config" in snapshot:
        state["train_config"] = snapshot["train_config"]
    return save_checkpoint(state, Path(out_dir), info["step"]), info

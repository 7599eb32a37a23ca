"""Reverse-process samplers: DDPM ancestral sampling (Algorithm 2) and DDIM, plus the few-step
solvers of ddpm/solvers.py (DPM-Solver++, UniPC, Heun), all behind one SamplerConfig.

Both walk a decreasing sequence of timesteps t_k > t_{k-1} > ... > 0. At each step the network's
output gives x_0 and eps (optionally with x_0 clipped to [-1, 1]), and

    DDPM:  x_prev = posterior_mean(x_0, x_t) + sigma z,     sigma^2 = beta ("fixed large", the paper's
           CIFAR-10 choice) or beta-tilde ("fixed small")
    DDIM:  x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
           sigma = eta * sqrt(beta-tilde)   (eta = 0: deterministic; eta = 1: DDPM with beta-tilde)

where beta and beta-tilde are those of the (possibly respaced) pair (t, t_prev):
beta = 1 - abar_t / abar_prev. With all T steps that is exactly the trained schedule.

Noise is drawn per image from its own generator seeded by (seed, image index), so image i is
the same whatever the batch size or the number of images asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Callable, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ddpm.diffusion import PredictionType, posterior_coefficients, predict_x0_and_epsilon, q_sample
from ddpm.guidance import (DEFAULT_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE, ClassifierFreeGuidance, balanced_labels,
                           check_class_labels)
from ddpm.schedules import NoiseSchedule
from ddpm.solvers import DPMSolverPP, HeunKarras, UniPC, _Solver

Tensor = torch.Tensor
Spacing = Literal["leading", "trailing", "linspace"]


def timestep_sequence(num_train_timesteps: int, num_steps: int, spacing: Spacing = "leading") -> list[int]:
    """`num_steps` of the 0-based training timesteps, in decreasing order.

    leading (DDIM paper, diffusers default): 0, k, 2k, ...;  trailing: T-1, T-1-k, ... (always
    starts from the last, noisiest step);  linspace: rounded evenly spaced from 0 to T-1.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        stride = num_train_timesteps // num_steps
        steps = [i * stride for i in range(num_steps)]
    elif spacing == "trailing":
        stride = num_train_timesteps / num_steps
        steps = sorted({round(num_train_timesteps - 1 - i * stride) for i in range(num_steps)})
    elif spacing == "linspace":
        steps = torch.linspace(0, num_train_timesteps - 1, num_steps).round().long().unique().tolist()
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; choose leading, trailing or linspace")
    return sorted(steps, reverse=True)


@dataclass
class DDPMSampler:
    """Ancestral sampling (Algorithm 2), with all T steps or respaced to `num_steps`."""

    schedule: NoiseSchedule
    variance: Literal["beta", "beta_tilde"] = "beta"
    clip_x0: bool = True
    prediction_type: PredictionType = "epsilon"
    num_steps: int | None = None
    spacing: Spacing = "linspace"

    def __post_init__(self):
        if self.variance not in ("beta", "beta_tilde"):
            raise ValueError(f"DDPM variance must be 'beta' or 'beta_tilde', got '{self.variance}'")

    def timesteps(self) -> list[int]:
        T = self.schedule.num_timesteps
        return list(range(T - 1, -1, -1)) if self.num_steps in (None, T) else timestep_sequence(T, self.num_steps, self.spacing)

    def step(self, model_output: Tensor, t: int, t_prev: int, x_t: Tensor, noise: Tensor) -> Tensor:
        abar_t, abar_prev = _alphas_cumprod_pair(self.schedule, t, t_prev)
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        x0, _ = predict_x0_and_epsilon(self.schedule, x_t, tt, model_output, self.prediction_type, self.clip_x0)
        # posterior q(x_prev | x_t, x_0) of the pair (t, t_prev), eqs. 6-7
        coef_x0, coef_xt, beta_tilde, beta = posterior_coefficients(abar_t, abar_prev)
        mean = coef_x0 * x0 + coef_xt * x_t
        if t_prev < 0:  # the last step returns the mean (z = 0 in Algorithm 2)
            return mean
        variance = beta if self.variance == "beta" else beta_tilde
        return mean + variance**0.5 * noise


@dataclass
class DDIMSampler:
    """DDIM (Song et al. 2021) over `num_steps` timesteps; eta scales the injected noise."""

    schedule: NoiseSchedule
    num_steps: int = 50
    eta: float = 0.0
    clip_x0: bool = True
    prediction_type: PredictionType = "epsilon"
    spacing: Spacing = "leading"

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {self.eta}")

    def timesteps(self) -> list[int]:
        return timestep_sequence(self.schedule.num_timesteps, self.num_steps, self.spacing)

    def step(self, model_output: Tensor, t: int, t_prev: int, x_t: Tensor, noise: Tensor) -> Tensor:
        abar_t, abar_prev = _alphas_cumprod_pair(self.schedule, t, t_prev)
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        # eps is recomputed from the clipped x_0 so the two stay consistent with x_t
        x0, eps = predict_x0_and_epsilon(self.schedule, x_t, tt, model_output, self.prediction_type, self.clip_x0)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        return x_prev + sigma * noise if sigma > 0 else x_prev


Sampler = DDPMSampler | DDIMSampler | DPMSolverPP | UniPC | HeunKarras


def _alphas_cumprod_pair(schedule: NoiseSchedule, t: int, t_prev: int) -> tuple[float, float]:
    abar_t = float(schedule.alphas_cumprod[t])
    abar_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    return abar_t, abar_prev


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index)."""
    generators = []
    for index in indices:
        # a hash rather than seed + index, so (seed, i) and (seed + 1, i - 1) stay unrelated
        digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return generators


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> Tensor:
    """A (len(generators), *shape) batch of N(0, I), each image from its own generator."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def reverse_process(
    model: torch.nn.Module,
    sampler: Sampler,
    x_t: Tensor,
    generators: list[torch.Generator],
    start_t: int | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Tensor:
    """Run the sampler from x_t at timestep `start_t` (default: the noisiest) down to x_0."""
    if isinstance(sampler, _Solver):
        noise = lambda: per_image_noise(generators, x_t.shape[1:], x_t.device, x_t.dtype)  # noqa: E731
        return sampler.sample(model, x_t, noise, start_t, progress)
    timesteps = sampler.timesteps()
    if start_t is not None:  # begin at start_t, then follow the sampler's own steps below it
        timesteps = [start_t, *(t for t in timesteps if t < start_t)]
    pairs = list(zip(timesteps, [*timesteps[1:], -1]))
    for t, t_prev in progress(pairs) if progress else pairs:
        batch_t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        model_output = model(x_t, batch_t)
        noise = per_image_noise(generators, x_t.shape[1:], x_t.device, x_t.dtype) if t_prev >= 0 else None
        x_t = sampler.step(model_output, t, t_prev, x_t, noise)
    return x_t


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    sampler: Sampler,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
    class_labels: Tensor | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Draw `num_images` samples in [-1, 1] (float32, on the CPU), in batches that fit memory.

    Image i depends only on (seed, i) (and its class): the same seed gives the same images for
    any batch size. `class_labels` (num_images,) ask a class-conditional model for those classes,
    with classifier-free guidance of scale `guidance_scale` (ddpm.guidance); without them a
    class-conditional model draws from its null class, unconditionally.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    config = model.config
    if class_labels is not None:
        class_labels = check_class_labels(class_labels, config.num_classes)
        if len(class_labels) != num_images:
            raise ValueError(f"{len(class_labels)} class labels for {num_images} images")
    shape = (config.in_channels, config.image_size, config.image_size)
    param = next(model.parameters())
    images = []
    for start in range(0, num_images, batch_size):
        indices = range(start, min(start + batch_size, num_images))
        generators = image_generators(seed, indices)
        x_T = per_image_noise(generators, shape, device, param.dtype)
        network = model if class_labels is None else \
            ClassifierFreeGuidance(model, class_labels[indices.start:indices.stop].to(device), guidance_scale)
        images.append(reverse_process(network, sampler, x_T, generators, progress=progress).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def denoise(
    model: torch.nn.Module, sampler: Sampler, x0: Tensor, t: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Noise real images to x_t ~ q(x_t | x_0), then run the reverse process back from t.

    Returns (x_t, reconstruction). Small t keeps the content; large t keeps only coarse layout.
    """
    schedule = sampler.schedule
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must be in [0, {schedule.num_timesteps}), got {t}")
    generators = image_generators(seed, range(x0.shape[0]))
    noise = per_image_noise(generators, x0.shape[1:], x0.device, x0.dtype)
    x_t = q_sample(schedule, x0, torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long), noise)
    return x_t, reverse_process(model, sampler, x_t, generators, start_t=t)


@torch.no_grad()
def interpolate(
    model: torch.nn.Module,
    sampler: Sampler,
    x0_a: Tensor,
    x0_b: Tensor,
    lambdas: Iterable[float],
    t: int,
    seed: int = 0,
) -> Tensor:
    """Interpolation in the diffused latent (section 4.3 / the article's 3.2).

    Both images are encoded with the same noise to x_t and x'_t ~ q(x_t | x_0); the mixtures
    (1 - lambda) x_t + lambda x'_t are decoded by the reverse process, one per lambda, with the
    same sampling noise. Returns (len(lambdas), C, H, W).
    """
    schedule = sampler.schedule
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must be in [0, {schedule.num_timesteps}), got {t}")
    lambdas = [float(lam) for lam in lambdas]
    generator = image_generators(seed, [0])[0]
    noise = torch.randn(x0_a.shape[-3:], generator=generator).to(x0_a)
    tt = torch.full((1,), t, device=x0_a.device, dtype=torch.long)
    x_t_a = q_sample(schedule, x0_a.reshape(1, *x0_a.shape[-3:]), tt, noise)
    x_t_b = q_sample(schedule, x0_b.reshape(1, *x0_b.shape[-3:]), tt, noise)
    mixed = torch.cat([(1 - lam) * x_t_a + lam * x_t_b for lam in lambdas])
    # the same sampling noise for every lambda, so only the latent changes along the row
    generators = image_generators(seed + 1, [0] * len(lambdas))
    return reverse_process(model, sampler, mixed, generators, start_t=t)


@dataclass(frozen=True)
class SamplerKind:
    """One entry of SAMPLERS: its steps when SamplerConfig.num_steps is None (None: all T steps),
    and how a SamplerConfig becomes that sampler over a schedule, at `steps` steps."""

    default_steps: int | None
    build: Callable[[SamplerConfig, NoiseSchedule, PredictionType, int], Sampler]


# The samplers by name: SamplerConfig's choices, the CLI's and the served model's. A new sampler is
# its class (here or in ddpm/solvers.py) and one line. Default steps: ddpm all T (Algorithm 2, not
# a respaced approximation); ddim 50 (its pick in docs/benchmarks.md section 3); the solvers 20,
# where each is within 5% of its best FID in the solver table (section 7).
SAMPLERS: dict[str, SamplerKind] = {
    # respaced DDPM has no "leading" variant: it takes "leading" (the default) as "linspace"
    "ddpm": SamplerKind(None, lambda c, schedule, prediction, steps: DDPMSampler(
        schedule, c.variance, c.clip_x0, prediction, steps, "linspace" if c.spacing == "leading" else c.spacing)),
    "ddim": SamplerKind(50, lambda c, schedule, prediction, steps: DDIMSampler(
        schedule, steps, c.eta, c.clip_x0, prediction, c.spacing)),
    "dpm++2m": SamplerKind(20, lambda c, schedule, prediction, steps: DPMSolverPP(
        schedule, steps, c.clip_x0, prediction, c.order, sde=False)),
    "dpm++2m-sde": SamplerKind(20, lambda c, schedule, prediction, steps: DPMSolverPP(
        schedule, steps, c.clip_x0, prediction, c.order, sde=True)),
    "unipc": SamplerKind(20, lambda c, schedule, prediction, steps: UniPC(
        schedule, steps, c.clip_x0, prediction, c.order)),
    "heun": SamplerKind(20, lambda c, schedule, prediction, steps: HeunKarras(
        schedule, steps, c.clip_x0, prediction, c.order)),
}
SamplerName = Literal[tuple(SAMPLERS)]
DEFAULT_STEPS: dict[str, int | None] = {name: kind.default_steps for name, kind in SAMPLERS.items()}


class SamplerConfig(BaseModel):
    """How to draw images from a trained model; `build` turns it into a sampler.

    sampler: ddpm (Algorithm 2), ddim, or a few-step solver (ddpm/solvers.py): dpm++2m,
    dpm++2m-sde, unipc (bh2), heun (Karras sigmas). num_steps: sampling steps, which is the
    number of network evaluations for all but heun (2 per step, NFE = 2 * steps - 1); None means
    the sampler's own default (DEFAULT_STEPS): all T steps for ddpm, so `sampler="ddpm"` is
    Algorithm 2 unless steps are asked for. order: of the solvers (1 or 2). eta, variance and
    spacing are DDIM's / DDPM's. classes and guidance_scale are for class-conditional models
    (ddpm.guidance): every sampler is guided by the same classifier-free mix.

    The default (DPM-Solver++ 2M SDE, 20 steps) is the cheapest setting within 10% of the best
    FID in the solver table of docs/benchmarks.md (section 7): FID 16.65 against DDIM-50 eta 1's
    16.06 (the previous default) and DDPM-1000's 21.01, at 2.5x fewer network evaluations than
    DDIM-50 and 50x fewer than DDPM-1000.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampler: SamplerName = Field("dpm++2m-sde", description="ddpm, ddim, or a few-step solver (SAMPLERS)")
    num_steps: int | None = Field(None, ge=1, description="sampling steps; default: the sampler's own (all T for "
                                                         "ddpm, 50 for ddim, 20 for the solvers)")
    eta: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                       description="DDIM's noise scale (0 deterministic, 1 ancestral-like); no other sampler reads it")
    order: int = Field(2, ge=1, le=2, description="solver order (dpm++2m, dpm++2m-sde, unipc, heun)")
    variance: Literal["beta", "beta_tilde"] = "beta"
    clip_x0: bool = True
    spacing: Spacing = Field("leading", description="the timesteps of fewer than T steps (ddim, respaced ddpm); "
                                                     "ddpm takes 'leading' as 'linspace'")
    num_images: int = Field(64, ge=1, description="images to draw")
    seed: int = Field(0, description="image i has its own generator from (seed, i): the same images whatever the batch size")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    classes: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, min_length=1, description="class-conditional models: the classes to draw, image i of class "
                                        "classes[i mod len]; None: every class in turn")
    guidance_scale: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
        description="classifier-free guidance w (0 unconditional, 1 conditional, > 1 guided); None: "
                    f"{DEFAULT_GUIDANCE_SCALE:g} for class-conditional models")

    def class_labels(self, num_classes: int | None) -> Tensor | None:
        """The label of each of the num_images images for a model of `num_classes` classes (None:
        unconditional); ValueError when classes or guidance are asked of an unconditional model."""
        if num_classes is None:
            if self.classes is not None or self.guidance_scale is not None:
                asked = "classes" if self.classes is not None else "guidance"
                raise ValueError(f"{asked} asked for, but this model is unconditional (num_classes None): "
                                 "train it with num_classes (ddpm train --conditional) to sample a class")
            return None
        if self.classes is None:
            return balanced_labels(self.num_images, num_classes)
        classes = check_class_labels(self.classes, num_classes)
        return classes[torch.arange(self.num_images) % len(classes)]

    def guidance(self) -> float:
        """The guidance scale of a class-conditional model (the default when none was asked)."""
        return DEFAULT_GUIDANCE_SCALE if self.guidance_scale is None else self.guidance_scale

    def steps(self, num_timesteps: int) -> int:
        """The sampling steps this config means for a model of `num_timesteps` diffusion steps."""
        return self.num_steps or DEFAULT_STEPS[self.sampler] or num_timesteps

    def build(self, schedule: NoiseSchedule, prediction_type: PredictionType = "epsilon") -> Sampler:
        return SAMPLERS[self.sampler].build(self, schedule, prediction_type, self.steps(schedule.num_timesteps))

    def describe(self) -> str:
        steps = self.num_steps or DEFAULT_STEPS[self.sampler] or "T"
        if self.sampler == "ddpm":
            name = f"ddpm-{steps}-{self.variance}"
        elif self.sampler == "ddim":
            name = f"ddim-{steps}-eta{self.eta:g}"
        else:
            name = f"{self.sampler}-{steps}" + ("" if self.order == 2 else f"-order{self.order}")
        if self.classes is not None:
            name += "-class" + "_".join(map(str, self.classes[:8])) + ("_etc" if len(self.classes) > 8 else "")
        return name + (f"-cfg{self.guidance_scale:g}" if self.guidance_scale is not None else "")

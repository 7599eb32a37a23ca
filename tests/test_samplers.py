"""Samplers: exactness on a known distribution, determinism, batch-size independence, experiments."""

import pytest
import torch

from ddpm.diffusion import epsilon_from_x0, q_sample
from ddpm.samplers import (
    DEFAULT_STEPS,
    DDIMSampler,
    DDPMSampler,
    SamplerConfig,
    denoise,
    generate,
    image_generators,
    interpolate,
    reverse_process,
    timestep_sequence,
)
from ddpm.schedules import NoiseSchedule
from ddpm.unet import UNet, preset


class PointMassDenoiser(torch.nn.Module):
    """The exact eps-predictor when all data is the constant image `value`."""

    def __init__(self, schedule, value, size=4):
        super().__init__()
        self.schedule, self.value = schedule, value
        self.config = preset("tiny-16", image_size=size, channel_mults=(1,), attention_resolutions=())
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        return epsilon_from_x0(self.schedule, x_t, t, torch.full_like(x_t, self.value))


@pytest.mark.parametrize("sampler_name,options", [
    ("ddpm", {"variance": "beta"}),
    ("ddpm", {"variance": "beta_tilde"}),
    ("ddpm", {"num_steps": 50}),
    ("ddim", {"num_steps": 20, "eta": 0.0}),
    ("ddim", {"num_steps": 20, "eta": 1.0, "spacing": "trailing"}),
])
def test_exact_denoiser_recovers_the_data_point(sampler_name, options):
    schedule = NoiseSchedule.from_name("linear", 200)
    model = PointMassDenoiser(schedule, 0.5)
    sampler = {"ddpm": DDPMSampler, "ddim": DDIMSampler}[sampler_name](schedule, **options)
    images = generate(model, sampler, 4, seed=0)
    assert torch.allclose(images, torch.full_like(images, 0.5), atol=1e-3)


def test_same_seed_same_images_whatever_the_batch_size():
    torch.manual_seed(0)
    model = UNet(preset("tiny-16")).eval()
    schedule = NoiseSchedule.from_name("linear", 20)
    for sampler in (DDPMSampler(schedule), DDIMSampler(schedule, num_steps=5, eta=1.0)):
        all_at_once = generate(model, sampler, 6, seed=7, batch_size=6)
        in_pieces = generate(model, sampler, 6, seed=7, batch_size=4)
        first_two = generate(model, sampler, 2, seed=7)
        assert torch.allclose(all_at_once, in_pieces, atol=1e-5)
        assert torch.allclose(all_at_once[:2], first_two, atol=1e-5)
        assert not torch.allclose(all_at_once, generate(model, sampler, 6, seed=8), atol=1e-2)


def test_timestep_spacings():
    assert timestep_sequence(1000, 4, "leading") == [750, 500, 250, 0]
    assert timestep_sequence(1000, 4, "trailing") == [999, 749, 499, 249]
    assert timestep_sequence(1000, 4, "linspace") == [999, 666, 333, 0]
    assert len(timestep_sequence(1000, 1000, "leading")) == 1000
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        timestep_sequence(1000, 0)


def test_ddim_eta_zero_is_deterministic_given_x_T():
    torch.manual_seed(0)
    model = UNet(preset("tiny-16")).eval()
    schedule = NoiseSchedule.from_name("linear", 50)
    a = generate(model, DDIMSampler(schedule, num_steps=10, eta=0.0), 2, seed=1)
    b = generate(model, DDIMSampler(schedule, num_steps=10, eta=0.0), 2, seed=1)
    assert torch.equal(a, b)


def test_denoise_and_interpolate_shapes_and_endpoints():
    schedule = NoiseSchedule.from_name("linear", 100)
    model = PointMassDenoiser(schedule, -0.25)
    sampler = DDPMSampler(schedule)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    x_t, restored = denoise(model, sampler, x0, t=30)
    assert x_t.shape == restored.shape == x0.shape
    assert torch.allclose(restored, torch.full_like(restored, -0.25), atol=1e-3)
    row = interpolate(model, sampler, x0[0], x0[1], [0.0, 0.5, 1.0], t=30)
    assert row.shape == (3, 1, 4, 4)


def test_interpolation_endpoints_equal_denoising_each_image():
    torch.manual_seed(0)
    model = UNet(preset("tiny-16")).eval()
    schedule = NoiseSchedule.from_name("linear", 30)
    sampler = DDIMSampler(schedule, num_steps=30, eta=0.0)
    a, b = torch.rand(2, 1, 16, 16) * 2 - 1
    row = interpolate(model, sampler, a, b, [0.0, 1.0], t=20)
    # the encoder noise of interpolate(seed=0); DDIM with eta 0 draws no sampling noise
    noise = torch.randn(1, 16, 16, generator=image_generators(0, [0])[0])
    x_t = q_sample(schedule, a[None], torch.tensor([20]), noise)
    expected_a = reverse_process(model, sampler, x_t, image_generators(0, [0]), start_t=20)
    assert torch.allclose(row[0], expected_a[0], atol=1e-5)
    assert not torch.allclose(row[0], row[1], atol=1e-2)


def test_bad_sampler_options():
    schedule = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match="sampler"):
        SamplerConfig(sampler="euler")
    with pytest.raises(ValueError, match="DDPM variance must be 'beta' or 'beta_tilde'"):
        DDPMSampler(schedule, variance="learned")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMSampler(schedule, eta=-1)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        denoise(PointMassDenoiser(schedule, 0.0), DDPMSampler(schedule), torch.zeros(1, 1, 4, 4), t=10)


def test_unset_steps_mean_each_samplers_own_default_and_ddpm_means_algorithm_2():
    """`sampler="ddpm"` once ran a 50-step respaced DDPM because num_steps defaulted to 50."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    full = SamplerConfig(sampler="ddpm").build(schedule)
    assert full.timesteps() == list(range(999, -1, -1))
    assert SamplerConfig(sampler="ddpm", num_steps=50).build(schedule).timesteps()[:2] != [999, 998]
    for name, steps in DEFAULT_STEPS.items():
        config = SamplerConfig(sampler=name)
        assert config.steps(1000) == (steps or 1000)
        assert config.model_copy(update={"num_steps": 7}).steps(1000) == 7
    assert SamplerConfig(sampler="ddpm").describe() == "ddpm-T-beta"
    assert SamplerConfig(sampler="ddim").describe() == "ddim-50-eta1"

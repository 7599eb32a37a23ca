"""Model FLOPs per training image (ddpm.utilisation): per image, forward and backward counted."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddpm.unet import UNet, preset
from ddpm.utilisation import matmul_peak, training_flops_per_image


def forward_flops_per_image(config, batch: int = 2) -> float:
    model = UNet(config)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(batch, config.in_channels, config.image_size, config.image_size),
              torch.randint(0, 1000, (batch,)))
    return counter.get_total_flops() / batch


def test_training_flops_are_per_image_and_count_the_backward_pass():
    config = preset("tiny-16")
    flops = training_flops_per_image(config)
    assert training_flops_per_image(config, batch=5) == flops
    # backward computes the gradients of the inputs and of the weights of every layer, each as
    # costly as its forward; the first convolution's input (the noisy image) needs none
    forward = forward_flops_per_image(config)
    assert 2.9 * forward < flops < 3 * forward


def test_attention_is_counted_in_closed_form():
    """The middle block's attention over N = 8x8 tokens of C = 32 channels (tiny-16): q, k, v and
    the output projection 8 N C^2, the scores and their weighted sum 4 N^2 C, forward; the
    backward twice that (the gradients of both operands of every product)."""
    config = preset("tiny-16")
    tokens, channels = 8 * 8, 32
    attention = training_flops_per_image(config) - training_flops_per_image(
        config.model_copy(update={"middle_attention": False}))
    assert attention == 3 * (8 * tokens * channels**2 + 4 * tokens**2 * channels)


def test_counting_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    training_flops_per_image(preset("small-16"))   # initial weights and dropout both draw
    assert torch.equal(torch.get_rng_state(), state)


def test_matmul_peak_is_a_rate_in_gflops_and_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    peak = matmul_peak(torch.float32, torch.device("cpu"), repeats=1)
    assert 0.1 < peak < 1e5
    assert torch.equal(torch.get_rng_state(), state)


def test_training_utilisation_puts_the_figures_together(monkeypatch):
    import ddpm.utilisation as utilisation
    from ddpm.training import TrainConfig

    monkeypatch.setattr(utilisation, "matmul_peak", lambda dtype, device, tf32=False: 50.0)   # GFLOP/s, one device
    config = preset("tiny-16")
    figures = utilisation.training_utilisation(config, TrainConfig(device="cpu", nnodes=2, rdzv_endpoint="h:1"), 100.0)
    flops = training_flops_per_image(config)
    assert figures["gflops_per_image"] == flops / 1e9
    assert figures["achieved_gflops_per_second"] == flops * 100.0 / 1e9
    assert figures["peak_gflops_per_second"] == 100.0   # CPU: one peak per node, the cores shared
    assert figures["mfu"] == figures["achieved_gflops_per_second"] / 100.0
    assert utilisation.training_utilisation(config, TrainConfig(device="cpu"), 0.0) == {}   # no step trained


def test_a_failing_utilisation_measurement_is_a_warning_and_no_figures(monkeypatch, caplog):
    import logging

    import ddpm.utilisation as utilisation
    from ddpm.training import TrainConfig

    def fail(config):
        raise RuntimeError("no counter")

    monkeypatch.setattr(utilisation, "training_flops_per_image", fail)
    logger = logging.getLogger("test-utilisation")
    with caplog.at_level(logging.WARNING, logger="test-utilisation"):
        assert utilisation.training_utilisation(preset("tiny-16"), TrainConfig(device="cpu"), 100.0, logger) == {}
    assert [r.getMessage() for r in caplog.records if r.name == "test-utilisation"] == [
        "no utilisation figures: RuntimeError: no counter"]

"""Model FLOPs per training image (ddpm.utilisation): per image, forward and backward counted."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm.unet import UNet, preset
from ddpm.utilisation import matmul_peak, training_flops_per_image


def forward_flops_per_image(config, batch: int = 2) -> float:
    model = UNet(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
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


def test_counting_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    training_flops_per_image(preset("small-16"))   # initial weights and dropout both draw
    assert torch.equal(torch.get_rng_state(), state)


def test_matmul_peak_is_a_rate_in_gflops_and_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    peak = matmul_peak(torch.float32, torch.device("cpu"), repeats=1)
    assert 0.1 < peak < 1e5
    assert torch.equal(torch.get_rng_state(), state)

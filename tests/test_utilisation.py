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

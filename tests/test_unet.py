"""The UNet: parameter counts, shapes for each preset and size, time conditioning, config errors."""

import pytest
import torch

from ddpm.unet import PRESETS, UNet, UNetConfig, count_parameters, preset, timestep_embedding


def test_paper_cifar10_model_has_the_published_parameter_count():
    assert count_parameters(UNet(PRESETS["ddpm-cifar10"])) == 35_746_307


def test_small_preset_matches_the_diffusers_peer_model_size():
    # diffusers' UNet2DModel at (32, 64, 64), 2 layers/block, attention at 8x8, 16x16x1
    # (benchmarks/common.py DIFFUSERS_CONFIGS["small-16"], the twin the benchmarks time against)
    assert count_parameters(UNet(PRESETS["small-16"])) == 1_623_169


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_map_images_to_same_shape(name):
    config = PRESETS[name]
    model = UNet(config).eval()
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (16, (1, 2, 2)), (24, (1, 2, 2, 2)), (28, (1, 2, 2))])
def test_other_sizes_and_channel_counts(size, mults):
    config = UNetConfig(image_size=size, in_channels=3, base_channels=16, channel_mults=mults,
                        num_res_blocks=1, attention_resolutions=(size // 2,), num_groups=8, dropout=0.0)
    x = torch.randn(3, 3, size, size)
    assert UNet(config)(x, torch.tensor([1, 2, 3])).shape == x.shape


def test_article_layout_uses_transposed_convolutions_and_attention_at_low_levels():
    model = UNet(PRESETS["article-32"])
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    attention_levels = [i for i, level in enumerate(model.down_levels)
                        if not isinstance(level.attention[0], torch.nn.Identity)]
    assert attention_levels == [2, 3]  # (False, False, True, True) as in the article


def test_output_depends_on_the_timestep():
    torch.manual_seed(0)
    model = UNet(preset("tiny-16")).eval()
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_deterministic_under_a_seed():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = UNet(preset("tiny-16")).eval()
        outputs.append(model(torch.ones(1, 1, 16, 16), torch.tensor([5])))
    assert torch.equal(outputs[0], outputs[1])


def test_timestep_embedding_is_sin_cos():
    emb = timestep_embedding(torch.tensor([0, 1]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(1.0)))


@pytest.mark.parametrize("overrides,message", [
    ({"image_size": 20, "channel_mults": (1, 2, 2, 2)}, "divisible by 2\\^\\(levels-1\\) = 8"),
    ({"attention_resolutions": (5,)}, "attention_resolutions \\[5\\] are not feature-map sizes"),
    ({"dropout": 1.5}, "dropout"),
    ({"base_channels": 20}, "not divisible by num_groups=32"),
    ({"channel_mults": (1, 0)}, "positive integers"),
    ({"upsample": "bicubic"}, "upsample"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**overrides)


def test_wrong_input_shape_is_named():
    model = UNet(preset("tiny-16"))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 16, 16\), got \(1, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 16, 16), torch.tensor([0]))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'"):
        preset("huge")

"""The UNet noise predictor eps_theta(x_t, t) of the DDPM paper (its diffusion_tf/models/unet.py).

    x_t ──conv_in──► [ResBlock x n (+Attention) ─► Downsample] per level ─► Middle(Res, Attn, Res)
                                  │ skips                                          │
    eps ◄──conv_out── [ResBlock x (n+1) on concat(h, skip) (+Attention) ─► Upsample] per level

The timestep enters as a sinusoidal embedding, passed through an MLP, and is added inside every
residual block. A class-conditional model (`num_classes`) adds a learned class embedding to it,
emb = MLP(sinusoid(t)) + E[y], with one more row E[num_classes] for the null class that
classifier-free guidance trains with and samples the unconditional branch from. Channels at level i are `base_channels * channel_mults[i]` (the paper's
convention). Attention treats the pixels of a feature map as tokens and runs at the
resolutions listed in `attention_resolutions`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

Tensor = torch.Tensor


class UNetConfig(BaseModel):
    """Architecture of the noise predictor. Every field is validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(32, ge=4, description="height = width of the images")
    in_channels: int = Field(3, ge=1, description="image channels (1 gray, 3 RGB)")
    base_channels: int = Field(128, ge=1, description="channels of the first level")
    channel_mults: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1, description="level i has base * mult[i] channels")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per level in the encoder")
    attention_resolutions: tuple[int, ...] = Field((16,), description="feature-map sizes that get self-attention")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_groups: int = Field(32, ge=1, description="GroupNorm groups")
    num_heads: int = Field(1, ge=1, description="attention heads (the paper uses one)")
    upsample: Literal["nearest", "transpose"] = Field(
        "nearest", description="nearest x2 + 3x3 conv (paper) or 4x4 stride-2 ConvTranspose (labml article)"
    )
    middle_attention: bool = True
    num_classes: int | None = Field(None, ge=1, description="classes of a class-conditional model (plus a learned "
                                                            "null class for classifier-free guidance); None: "
                                                            "unconditional")

    @model_validator(mode="after")
    def _check(self) -> "UNetConfig":
        levels = len(self.channel_mults)
        if any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                f"for {levels} levels (channel_mults={self.channel_mults})"
            )
        resolutions = {self.image_size // 2**i for i in range(levels)}
        unused = sorted(set(self.attention_resolutions) - resolutions)
        if unused:
            raise ValueError(
                f"attention_resolutions {unused} are not feature-map sizes of this UNet; "
                f"its levels run at {sorted(resolutions, reverse=True)}"
            )
        for mult in {1, *self.channel_mults}:
            if (self.base_channels * mult) % self.num_groups:
                raise ValueError(
                    f"channels {self.base_channels * mult} (base_channels * {mult}) are not divisible "
                    f"by num_groups={self.num_groups}"
                )
            if (self.base_channels * mult) % self.num_heads:
                raise ValueError(f"channels {self.base_channels * mult} are not divisible by num_heads={self.num_heads}")
        return self


PRESETS: dict[str, UNetConfig] = {
    # The paper's CIFAR-10 model: 35,746,307 parameters.
    "ddpm-cifar10": UNetConfig(
        image_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2),
        num_res_blocks=2, attention_resolutions=(16,), dropout=0.1,
    ),
    # The labml.ai annotated DDPM layout the article draws (paper's channel convention):
    # n_channels 64, mults (1,2,2,4), attention at the two lowest levels, ConvTranspose up.
    "article-32": UNetConfig(
        image_size=32, in_channels=3, base_channels=64, channel_mults=(1, 2, 2, 4),
        num_res_blocks=2, attention_resolutions=(8, 4), dropout=0.1, upsample="transpose",
    ),
    # Small models for 16x16 gray images (digits, MNIST) that train on a CPU.
    "tiny-16": UNetConfig(
        image_size=16, in_channels=1, base_channels=16, channel_mults=(1, 2),
        num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, num_groups=8,
    ),
    "small-16": UNetConfig(
        image_size=16, in_channels=1, base_channels=32, channel_mults=(1, 2, 2),
        num_res_blocks=2, attention_resolutions=(8,), dropout=0.1, num_groups=8,
    ),
    # MNIST at full size (28x28 padded to 32x32) on a CPU: 280,177 parameters, ~150 img/s of
    # training on 2 cores.
    "tiny-32": UNetConfig(
        image_size=32, in_channels=1, base_channels=16, channel_mults=(1, 2, 2),
        num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, num_groups=8,
    ),
}


def preset(name: str, **overrides) -> UNetConfig:
    """A named configuration, with any field overridden (`preset("small-16", dropout=0.0)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset '{name}'; choose one of {sorted(PRESETS)}")
    return UNetConfig(**{**PRESETS[name].model_dump(), **overrides})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the timesteps (Transformer positions, as in the DDPM code):
    [sin(t w_0), ..., sin(t w_{d/2-1}), cos(t w_0), ...] with w_i = max_period^(-i / (d/2 - 1))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class ResidualBlock(nn.Module):
    """h = conv(dropout(SiLU(GN(conv(SiLU(GN(x))) + W SiLU(t_emb))))) + skip(x).

    The projected time embedding is added between the two convolutions; a 1x1 conv matches the
    channels of the skip path when they change.
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_channels, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W pixels as tokens: x + proj(softmax(q k^T / sqrt(d)) v).

    q, k and v are one linear map of the normalised tokens (the paper's 1x1 convolutions, as a
    matmul on (B, H*W, C), which is faster than a 1x1 conv); heads keep their features
    contiguous so scaled_dot_product_attention can use its fused kernels.
    """

    def __init__(self, channels: int, num_groups: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        # (B, H*W, 3C) -> 3 x (B, heads, H*W, C/heads)
        q, k, v = (
            self.qkv(tokens)
            .reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).reshape(batch, height * width, channels))
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 convolution of stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour + 3x3 conv (paper) or a 4x4 transposed conv."""

    def __init__(self, channels: int, mode: str = "nearest"):
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention if enabled."""

    def __init__(self, res_blocks: list[ResidualBlock], attention: list[nn.Module]):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attention = nn.ModuleList(attention)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): maps a noisy batch (B, C, H, W), timesteps (B,) and, for a
    class-conditional model, class labels (B,) to (B, C, H, W). Label `null_class` (and no labels
    at all) means unconditional."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        time_channels = 4 * c.base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(c.base_channels, time_channels), nn.SiLU(), nn.Linear(time_channels, time_channels)
        )
        # row num_classes is the null class: "no label" (label dropout, the unconditional branch)
        self.class_embedding = nn.Embedding(c.num_classes + 1, time_channels) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, time_channels, c.dropout, c.num_groups)

        def attn(channels: int, resolution: int) -> nn.Module:
            if resolution in c.attention_resolutions:
                return AttentionBlock(channels, c.num_groups, c.num_heads)
            return nn.Identity()

        # Encoder: remember the channels of every output that becomes a skip connection.
        skip_channels = [c.base_channels]
        channels, resolution = c.base_channels, c.image_size
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, mult in enumerate(c.channel_mults):
            blocks, attentions = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(res(channels, c.base_channels * mult))
                channels = c.base_channels * mult
                attentions.append(attn(channels, resolution))
                skip_channels.append(channels)
            self.down_levels.append(Level(blocks, attentions))
            last = level == len(c.channel_mults) - 1
            self.downsamples.append(nn.Identity() if last else Downsample(channels))
            if not last:
                skip_channels.append(channels)
                resolution //= 2

        self.mid_block1 = res(channels, channels)
        self.mid_attention = AttentionBlock(channels, c.num_groups, c.num_heads) if c.middle_attention else nn.Identity()
        self.mid_block2 = res(channels, channels)

        # Decoder: one more block per level than the encoder, each eating one skip connection.
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mults))):
            blocks, attentions = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(res(channels + skip_channels.pop(), c.base_channels * mult))
                channels = c.base_channels * mult
                attentions.append(attn(channels, resolution))
            self.up_levels.append(Level(blocks, attentions))
            self.upsamples.append(Upsample(channels, c.upsample) if level > 0 else nn.Identity())
            if level > 0:
                resolution *= 2

        self.norm_out = nn.GroupNorm(c.num_groups, channels)
        self.conv_out = nn.Conv2d(channels, c.in_channels, 3, padding=1)

    @property
    def null_class(self) -> int | None:
        """The label of the null class ("no label"), or None for an unconditional model."""
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c = self.config
        if x.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"UNet expects images of shape (B, {c.in_channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        time_emb = self.time_mlp(timestep_embedding(t, c.base_channels).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), c.num_classes, device=x.device, dtype=torch.long)
            time_emb = time_emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("this UNet is unconditional (num_classes is None): it takes no class labels")

        h = self.conv_in(x)
        skips = [h]
        for level, downsample in zip(self.down_levels, self.downsamples):
            for block, attention in zip(level.res_blocks, level.attention):
                h = attention(block(h, time_emb))
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, time_emb)), time_emb)

        for level, upsample in zip(self.up_levels, self.upsamples):
            for block, attention in zip(level.res_blocks, level.attention):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), time_emb))
            h = upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

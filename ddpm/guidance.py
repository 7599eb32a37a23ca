"""Classifier-free guidance (Ho & Salimans 2022) for a class-conditional UNet, in every sampler.

The network is trained with its labels dropped to the null class a share p_uncond of the time,
so one network gives both the conditional and the unconditional prediction. Sampling mixes them:

    eps = eps_uncond + w (eps_cond - eps_uncond)          w = 0: unconditional, 1: conditional

with both branches in one batched forward pass. The samplers call the guided model as they call
the plain one, `model(x_t, t)`. The same mix of the raw outputs is exact for x0- and
v-prediction too: x0, eps and v are affine in the output at a given (x_t, t), and the weights
(1 - w, w) sum to one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

Tensor = torch.Tensor
# w when a class-conditional model is sampled without one: the sweep of docs/benchmarks.md section 8
# (tiny-16, MNIST): w = 1.5 is the smallest with >= 98% conditional accuracy (99.1%; w = 1: 93.1%)
# and keeps the unconditional model's FID (fid_inception 16.7 vs 16.8); w = 2 costs +17% FID.
DEFAULT_GUIDANCE_SCALE = 1.5
MAX_GUIDANCE_SCALE = 20.0   # far past any useful scale (images saturate beyond ~10): a bound on requests


class ClassifierFreeGuidance:
    """`model` as a function of (x_t, t) alone, guided towards `class_labels` (one per image) with scale w."""

    def __init__(self, model: nn.Module, class_labels: Tensor, guidance_scale: float):
        if model.config.num_classes is None:
            raise ValueError("guidance needs a class-conditional model; this one is unconditional (num_classes None)")
        self.model, self.class_labels, self.scale = model, class_labels, float(guidance_scale)
        self.config = model.config

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        labels = self.class_labels.to(x.device)
        null = torch.full_like(labels, self.config.num_classes)
        if self.scale == 1.0:   # the conditional branch alone: one pass
            return self.model(x, t, labels)
        if self.scale == 0.0:   # the unconditional branch alone
            return self.model(x, t, null)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def check_class_labels(class_labels: Sequence[int] | Tensor, num_classes: int | None) -> Tensor:
    """The labels as an int64 tensor; ValueError naming the problem when the model cannot take them."""
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if num_classes is None:
        raise ValueError("classes were asked for, but this model is unconditional (num_classes None): "
                         "train it with num_classes (ddpm train --conditional) to sample a class")
    bad = sorted({int(y) for y in labels if not 0 <= int(y) < num_classes})
    if bad:
        raise ValueError(f"class(es) {bad} outside this model's classes 0..{num_classes - 1}")
    return labels


def balanced_labels(num_images: int, num_classes: int) -> Tensor:
    """Image i asks for class i mod num_classes: every class equally often, whatever the batch size."""
    return torch.arange(num_images) % num_classes

"""FID on top of torchmetrics, from features computed once (ddpm.metrics.measures).

The Frechet distance itself is torchmetrics' FrechetInceptionDistance, fed features instead of
images (an identity "network"), in the batches it always saw, so its running sums and its FIDs
are those of feeding it the images. This module adds what the pipeline needs around it: input
checks with clear errors, reference statistics derived from the cached reference features and
loaded back into the metric's states, the real-vs-real floor, and the classifier's confidence /
class histogram on samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import DigitClassifier, predict_logits
from .extractors import (  # re-exported: this is the module callers import from
    INSTALL_HINT,
    FeatureExtractor,
    InceptionUnavailable,
    classifier_extractor,
    inception_available,
    inception_extractor,
)
from .measures import FEATURE_BATCH, features, metric_name, reference_features

__all__ = [
    "FIDInputError",
    "FeatureExtractor",
    "INSTALL_HINT",
    "InceptionUnavailable",
    "ReferenceStats",
    "classifier_extractor",
    "classifier_summary",
    "frechet_distance",
    "inception_available",
    "inception_extractor",
    "metric_name",
    "plot_class_histogram",
    "real_vs_real_fid",
    "reference_statistics",
]


class FIDInputError(ValueError):
    """Images unfit for FID: too few, not uint8 (N, C, H, W), or shaped unlike the reference."""


@dataclass
class ReferenceStats:
    """Gaussian summary of reference features: what FID compares generated samples against."""

    mean: Tensor  # (d,) float64
    covariance: Tensor  # (d, d) float64, unbiased (divided by count - 1), as torchmetrics computes it
    count: int
    extractor: str  # extractor name, e.g. "classifier"
    extractor_digest: str  # identifies the extractor's weights
    image_shape: tuple[int, int, int]  # (C, H, W) of the reference images
    was_cached: bool = False


def _check_images(images: Tensor, what: str, expected_shape=None, expected_source: str = "") -> None:
    """Raise FIDInputError unless `images` is uint8 (N>=2, C, H, W) with (C, H, W) == expected_shape."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise FIDInputError(f"{what} images must be a uint8 tensor (N, C, H, W) in [0, 255], got {got}")
    if images.dim() != 4:
        raise FIDInputError(f"{what} images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise FIDInputError(f"FID needs at least 2 {what} images, got {images.shape[0]}")
    if expected_shape is not None and tuple(images.shape[1:]) != tuple(expected_shape):
        raise FIDInputError(
            f"{what} images have shape (C, H, W) = {tuple(images.shape[1:])}, "
            f"but {expected_source} has (C, H, W) = {tuple(expected_shape)}"
        )


class _GivenFeatures(nn.Module):
    """The "network" of a FID metric fed features: returns them as they are."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: Tensor) -> Tensor:
        return feats


def _new_fid_metric(num_features: int) -> FrechetInceptionDistance:
    # reset_real_features=False keeps the reference half across reset() so one metric can score
    # several sample sets; num_features is given (no dummy forward).
    return FrechetInceptionDistance(feature=_GivenFeatures(num_features), reset_real_features=False, normalize=False)


def _update(metric: FrechetInceptionDistance, feats: Tensor, real: bool) -> None:
    """Feed features in batches of FEATURE_BATCH: the sums torchmetrics forms feeding it the images."""
    for batch in feats.double().split(FEATURE_BATCH):
        metric.update(batch, real=real)


def stats_from_features(feats: Tensor, extractor: str, digest: str, image_shape) -> ReferenceStats:
    """Mean and covariance of features, exactly as torchmetrics forms them from its running sums."""
    metric = _new_fid_metric(feats.shape[1])
    _update(metric, feats, real=True)
    n = int(metric.real_features_num_samples)
    mean = metric.real_features_sum / n
    covariance = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return ReferenceStats(mean=mean.double().cpu().clone(), covariance=covariance.double().cpu().clone(), count=n,
                          extractor=extractor, extractor_digest=digest,
                          image_shape=tuple(int(x) for x in image_shape))


def _load_into_metric(metric: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Write stats back as the sums torchmetrics accumulates (sum x, sum x x^T, n): no recomputation."""
    n = stats.count
    mean = stats.mean.to(metric.real_features_sum)
    metric.real_features_sum.copy_(mean * n)
    metric.real_features_cov_sum.copy_(stats.covariance.to(mean) * (n - 1) + n * torch.outer(mean, mean))
    metric.real_features_num_samples.fill_(n)


def _check_stats_match(stats: ReferenceStats, extractor: FeatureExtractor) -> None:
    if (stats.extractor, stats.extractor_digest) != (extractor.name, extractor.digest):
        raise FIDInputError(
            f"reference statistics were computed with extractor {stats.extractor!r} "
            f"(weights {stats.extractor_digest}), not {extractor.name!r} (weights {extractor.digest})"
        )


def reference_statistics(
    extractor: FeatureExtractor, images_uint8: Tensor, cache_dir: Path, fingerprint: str, batch_size: int = 256
) -> ReferenceStats:
    """Feature mean/covariance of the reference (holdout) images, derived from their features,
    which are cached per (extractor digest, fingerprint) (measures.reference_features).

    A cache file made with other extractor weights, another image shape or image count is stale:
    recomputed and replaced. The returned stats have was_cached=True when the features came from
    the cache.
    """
    _check_images(images_uint8, "reference", extractor.input_shape, f"the {extractor.name} extractor")
    reference = reference_features(extractor, images_uint8, cache_dir, fingerprint)
    stats = reference.stats()
    stats.was_cached = reference.was_cached
    return stats


def fid_from_features(reference: ReferenceStats | Tensor, generated: Tensor) -> float:
    """FID of generated features against reference statistics (or reference features), by
    torchmetrics. Returned as computed: for identical sets it can be a tiny negative number."""
    if len(generated) < 2:
        raise FIDInputError(f"FID needs at least 2 generated images, got {len(generated)}")
    metric = _new_fid_metric(generated.shape[1])
    if isinstance(reference, ReferenceStats):
        _load_into_metric(metric, reference)
    else:
        _update(metric, reference, real=True)
    _update(metric, generated, real=False)
    return float(metric.compute())


def frechet_distance(
    extractor: FeatureExtractor,
    reference: ReferenceStats | Tensor,
    generated_uint8: Tensor,
    batch_size: int = 256,
) -> float:
    """FID between reference (cached stats or uint8 images) and generated uint8 images, via torchmetrics.

    Returned as computed: for identical sets it can be a tiny negative number (eigenvalue round-off).
    """
    if isinstance(reference, ReferenceStats):
        _check_stats_match(reference, extractor)
        if reference.count < 2:
            raise FIDInputError(f"FID needs at least 2 reference images, got {reference.count}")
        reference_shape = reference.image_shape
    else:
        _check_images(reference, "reference", extractor.input_shape, f"the {extractor.name} extractor")
        reference_shape = tuple(reference.shape[1:])
    _check_images(generated_uint8, "generated", reference_shape, "the reference data")

    if not isinstance(reference, ReferenceStats):
        reference = features(extractor, reference, "reference", batch_size)
    return fid_from_features(reference, features(extractor, generated_uint8, "generated", batch_size))


def real_vs_real_fid(
    extractor: FeatureExtractor, train_uint8: Tensor, reference: ReferenceStats | Tensor, n: int, seed: int = 0
) -> float:
    """FID of n random real train images against the reference (the holdout split, as uint8 images
    or its cached statistics): what a perfect model scores with n samples against the same
    reference. FID is biased upwards at finite n, so compare a model's FID with the floor at its n."""
    generator = torch.Generator().manual_seed(seed)
    n = min(n, len(train_uint8))
    train_subset = train_uint8[torch.randperm(len(train_uint8), generator=generator)[:n]]
    return frechet_distance(extractor, reference, train_subset)


def classifier_summary(classifier: DigitClassifier, generated_uint8: Tensor) -> dict:
    """Cheap Inception-Score analogue: mean max softmax probability and predicted-class counts."""
    cfg = classifier.config
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if not isinstance(generated_uint8, Tensor) or generated_uint8.dtype != torch.uint8 or generated_uint8.dim() != 4:
        raise FIDInputError("generated images must be a uint8 tensor (N, C, H, W) in [0, 255]")
    if len(generated_uint8) == 0:
        raise FIDInputError("classifier summary needs at least 1 generated image, got 0")
    if tuple(generated_uint8.shape[1:]) != shape:
        raise FIDInputError(
            f"generated images have shape (C, H, W) = {tuple(generated_uint8.shape[1:])}, "
            f"but the classifier has (C, H, W) = {shape}"
        )
    probs = predict_logits(classifier, generated_uint8).softmax(dim=1)
    histogram = torch.bincount(probs.argmax(dim=1), minlength=cfg["num_classes"])
    return {"mean_confidence": probs.max(dim=1).values.mean().item(), "class_histogram": histogram.tolist()}


def plot_class_histogram(histogram: list[int], class_names: list[str] | None, path: Path) -> Path:
    """Bar chart PNG of predicted-class counts; uses the Agg canvas directly (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = class_names if class_names is not None else [str(i) for i in range(len(histogram))]
    if len(names) != len(histogram):
        raise ValueError(f"{len(names)} class names for {len(histogram)} histogram bins")
    fig = Figure(figsize=(max(4.0, 0.4 * len(histogram)), 3.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(histogram)), histogram, color="tab:blue")
    ax.set_xticks(range(len(histogram)), names, rotation=90 if len(histogram) > 20 else 0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("samples")
    ax.set_title(f"Classifier predictions on {sum(histogram)} samples")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path

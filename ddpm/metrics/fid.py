"""FID on top of torchmetrics, with cached reference statistics.

The Frechet distance itself is torchmetrics' FrechetInceptionDistance; this module adds what the
pipeline needs around it: input checks with clear errors, reference statistics computed once per
(dataset fingerprint, extractor) and loaded back into the metric's states, the real-vs-real floor,
and the classifier's confidence / class histogram on samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ..progress import progress_bar
from .classifier import DigitClassifier, _save_atomically, predict_logits
from .extractors import (  # re-exported: this is the module callers import from
    INSTALL_HINT,
    FeatureExtractor,
    InceptionUnavailable,
    classifier_extractor,
    inception_available,
    inception_extractor,
)

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


def metric_name(extractor: FeatureExtractor | str) -> str:
    """Name under which an FID is logged, e.g. "fid_classifier": never compare different extractors."""
    return f"fid_{extractor if isinstance(extractor, str) else extractor.name}"


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


def _new_fid_metric(extractor: FeatureExtractor) -> FrechetInceptionDistance:
    # num_features is read from the extractor (no dummy forward); reset_real_features=False keeps the
    # reference half across reset() so one metric can score several sample sets.
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=False)
    return metric.to(extractor.device)  # states must live where the features are computed


def _update(metric, images: Tensor, real: bool, batch_size: int) -> None:
    """Feed images to the metric in batches, with a progress bar once it has taken 2 s (Inception
    features cost ~0.14 s per image on 2 CPU cores: 350 images ~50 s, 10,000 reference images
    ~25 min). Batches of at most 64 keep the bar moving; the features do not depend on the batch."""
    batches = images.split(min(batch_size, 64))
    what = "reference" if real else "generated"
    with progress_bar(total=len(images), desc=f"{getattr(metric.inception, 'name', '')} features ({what})", unit="img",
                      leave=False, delay=2) as bar:
        for batch in batches:
            metric.update(batch, real=real)
            bar.update(len(batch))


def _stats_from_metric(metric: FrechetInceptionDistance, extractor, image_shape) -> ReferenceStats:
    """Mean and covariance from torchmetrics' running sums, exactly as its compute() forms them."""
    n = int(metric.real_features_num_samples)
    mean = metric.real_features_sum / n
    covariance = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return ReferenceStats(
        mean=mean.double().cpu().clone(),
        covariance=covariance.double().cpu().clone(),
        count=n,
        extractor=extractor.name,
        extractor_digest=extractor.digest,
        image_shape=tuple(int(s) for s in image_shape),
    )


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


def reference_cache_path(cache_dir: Path, extractor: FeatureExtractor, fingerprint: str) -> Path:
    return Path(cache_dir) / f"fid-ref-{extractor.name}-{fingerprint[:16]}.pt"


def _load_cached_stats(path: Path) -> ReferenceStats | None:
    """Stats saved by reference_statistics, or None when the file is absent or unreadable."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        saved["image_shape"] = tuple(saved["image_shape"])
        return ReferenceStats(**saved, was_cached=True)
    except Exception:  # a truncated or older-format cache is just recomputed
        return None


def reference_statistics(
    extractor: FeatureExtractor, images_uint8: Tensor, cache_dir: Path, fingerprint: str, batch_size: int = 256
) -> ReferenceStats:
    """Feature mean/covariance of the reference (holdout) images, cached per (fingerprint, extractor).

    A cache file made with other extractor weights, another image shape or image count is stale:
    recomputed and replaced.
    The returned stats have was_cached=True when they came from the cache.
    """
    _check_images(images_uint8, "reference", extractor.input_shape, f"the {extractor.name} extractor")
    path = reference_cache_path(cache_dir, extractor, fingerprint)
    cached = _load_cached_stats(path)
    if cached is not None and (cached.extractor_digest, cached.image_shape, cached.count) == (
        extractor.digest,
        tuple(images_uint8.shape[1:]),
        len(images_uint8),
    ):
        return cached

    metric = _new_fid_metric(extractor)
    _update(metric, images_uint8, real=True, batch_size=batch_size)
    stats = _stats_from_metric(metric, extractor, images_uint8.shape[1:])
    record = {k: v for k, v in vars(stats).items() if k != "was_cached"}
    record["image_shape"] = list(stats.image_shape)
    _save_atomically(record, path)
    return stats


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

    metric = _new_fid_metric(extractor)
    if isinstance(reference, ReferenceStats):
        _load_into_metric(metric, reference)
    else:
        _update(metric, reference, real=True, batch_size=batch_size)
    _update(metric, generated_uint8, real=False, batch_size=batch_size)
    return float(metric.compute())


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

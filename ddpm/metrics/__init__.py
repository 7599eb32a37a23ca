"""Sample-quality metrics: FID with Inception or the dataset's own classifier features."""

from .classifier import DigitClassifier, load_or_train_classifier, train_classifier
from .fid import (
    FeatureExtractor,
    FIDInputError,
    InceptionUnavailable,
    ReferenceStats,
    classifier_extractor,
    classifier_summary,
    frechet_distance,
    inception_available,
    inception_extractor,
    metric_name,
    plot_class_histogram,
    real_vs_real_fid,
    reference_statistics,
)

__all__ = [
    "DigitClassifier",
    "FIDInputError",
    "FeatureExtractor",
    "InceptionUnavailable",
    "ReferenceStats",
    "classifier_extractor",
    "classifier_summary",
    "frechet_distance",
    "inception_available",
    "inception_extractor",
    "load_or_train_classifier",
    "metric_name",
    "plot_class_histogram",
    "real_vs_real_fid",
    "reference_statistics",
    "train_classifier",
]

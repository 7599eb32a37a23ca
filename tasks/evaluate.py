"""FID evaluation tasks: feature extractor, reference statistics, FID of samples, logged to MLflow.

Metric names always carry the extractor (`fid_classifier`, `fid_inception`), so numbers measured
with different features are never compared. The real-vs-real floor (as many real train images as
samples, against the same holdout reference) is logged beside every FID: what a perfect model
scores with that many samples.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task

from ddpm.data import DataError, PreparedDataset, load_prepared
from ddpm.metrics.classifier import load_or_train_classifier
from ddpm.metrics.extractors import default_inception_weights_path, torch_fidelity_available
from ddpm.metrics.fid import (
    FeatureExtractor,
    classifier_extractor,
    classifier_summary,
    frechet_distance,
    inception_extractor,
    metric_name,
    plot_class_histogram,
    real_vs_real_fid,
    reference_statistics,
)
from tasks import plots, tracking
from tasks.settings import ddpm_home

ExtractorKind = Literal["auto", "classifier", "inception"]


def cache_dir() -> Path:
    path = ddpm_home(create=True) / "cache" / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    return path


def inception_ready(weights_path: str | None = None) -> bool:
    path = Path(weights_path) if weights_path else default_inception_weights_path()
    return torch_fidelity_available() and path.is_file()


def make_extractor(
    dataset: PreparedDataset, kind: ExtractorKind = "auto", inception_weights: str | None = None
) -> tuple[FeatureExtractor, dict]:
    """The feature extractor for `kind` and facts about it (classifier accuracy, cached or not).

    auto: Inception when the extra and its weights are installed, else the domain classifier
    trained on the dataset's labelled train split (cached by the dataset fingerprint).
    """
    if kind == "inception" or (kind == "auto" and inception_ready(inception_weights)):
        return inception_extractor(inception_weights), {}
    if kind not in ("auto", "classifier"):
        raise ValueError(f"unknown FID feature extractor '{kind}'; choose auto, classifier or inception")
    if dataset.labels is None:
        raise DataError(
            f"dataset {dataset.path} has no labels, so no domain classifier can be trained for "
            "fid_classifier; install the Inception extra (pip install 'ddpm-pipeline[inception]') "
            "and its weights, or give the images class sub-folders"
        )
    train_images, train_labels = dataset.split("train")
    holdout_images, holdout_labels = dataset.split("holdout")
    num_classes = len(dataset.manifest.get("class_names") or []) or int(dataset.labels.max()) + 1
    classifier, accuracy, was_cached = load_or_train_classifier(
        cache_dir(), dataset.fingerprint, train_images, train_labels, holdout_images, holdout_labels, num_classes
    )
    return classifier_extractor(classifier), {"classifier": classifier, "classifier_accuracy": accuracy,
                                              "classifier_cached": was_cached}


def load_samples(npz_path: str | Path) -> torch.Tensor:
    with np.load(npz_path) as data:
        return torch.from_numpy(data["images"])


@task(retries=1, retry_delay_seconds=2)
def evaluate_samples(
    samples_npz: str,
    dataset_path: str,
    run_id: str | None = None,
    step: int = 0,
    extractor: ExtractorKind = "auto",
    inception_weights: str | None = None,
) -> dict:
    """FID of the samples in `samples_npz` against the dataset's holdout split, plus the floor.

    Logs `fid_<extractor>` (and `fid_<extractor>_floor`) at `step` to MLflow run `run_id`; with
    the classifier, also its accuracy, the mean confidence on the samples and a class histogram.
    """
    dataset = load_prepared(Path(dataset_path))
    samples = load_samples(samples_npz)
    feature_extractor, facts = make_extractor(dataset, extractor, inception_weights)
    holdout, _ = dataset.split("holdout")
    train, _ = dataset.split("train")
    reference = reference_statistics(feature_extractor, holdout, cache_dir(), dataset.fingerprint)
    name = metric_name("fid", feature_extractor)
    result = {
        "metric": name,
        name: frechet_distance(feature_extractor, reference, samples),
        f"{name}_floor": real_vs_real_fid(feature_extractor, train, reference, len(samples)),
        "num_samples": len(samples),
        "step": step,
    }
    if "classifier" in facts:
        summary = classifier_summary(facts["classifier"], samples)
        result.update(classifier_accuracy=facts["classifier_accuracy"],
                      sample_confidence=summary["mean_confidence"], class_histogram=summary["class_histogram"])
    if run_id:
        metrics = {k: v for k, v in result.items() if isinstance(v, float)}
        mlflow_client = tracking.client()
        mlflow_client.log_batch(run_id, metrics=[
            tracking.Metric(k, v, int(time.time() * 1000), step) for k, v in metrics.items()
        ])
        mlflow_client.set_tag(run_id, "fid.metric", name)
        mlflow_client.set_tag(run_id, "fid.num_samples", str(len(samples)))
        if "class_histogram" in result:
            with tempfile.TemporaryDirectory() as tmp:
                with plots.RENDER_LOCK:  # matplotlib text layout is not thread-safe
                    path = plot_class_histogram(result["class_histogram"], dataset.manifest.get("class_names"),
                                                Path(tmp) / f"class_histogram-{step:07d}.png")
                tracking.log_file(run_id, path, "evaluation")
    return result

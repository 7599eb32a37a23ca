"""FID evaluation tasks: feature extractors, reference statistics, FID of samples, logged to MLflow.

Metric names always carry the extractor (`fid_inception`, `fid_classifier`), so numbers measured
with different features are never compared. With the default extractor "auto" a run logs every
FID it can: `fid_inception` when the `inception` extra is installed (the standard, comparable with
papers) and `fid_classifier` when the data has labels. The first of them is the run's primary
metric (tag `fid.metric`): what promotion, compare and retrain rank by. The real-vs-real floor (as
many real train images as samples, against the same holdout reference) is logged beside every FID:
what a perfect model scores with that many samples.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task

from ddpm.data import DataError, PreparedDataset, load_prepared
from ddpm.metrics.classifier import accuracy, load_or_train_classifier
from ddpm.metrics.extractors import INSTALL_HINT, inception_available, inception_weights
from ddpm.metrics.fid import (
    FeatureExtractor,
    FIDInputError,
    classifier_extractor,
    classifier_summary,
    frechet_distance,
    inception_extractor,
    metric_name,
    plot_class_histogram,
    real_vs_real_fid,
    reference_statistics,
)
from ddpm.progress import progress_bar
from ddpm.samplers import SamplerConfig
from tasks import plots, tracking
from tasks.config import ExtractorKind
from tasks.sample import draw_images, load_sampler
from tasks.settings import ddpm_home


def cache_dir() -> Path:
    path = ddpm_home(create=True) / "cache" / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    return path


def extractor_names(kind: ExtractorKind, has_labels: bool) -> list[str]:
    """The feature extractors an evaluation uses, the primary one first; raises before any work
    when one that was asked for cannot run (the extra missing, a damaged file, no labels)."""
    if kind not in ("auto", "classifier", "inception"):
        raise ValueError(f"unknown FID feature extractor {kind!r}; choose auto, classifier or inception")
    if kind == "inception" or (kind == "auto" and inception_available()):
        inception_weights()   # InceptionUnavailable naming the fix, before anything is trained
    if kind != "auto":
        if kind == "classifier" and not has_labels:
            raise DataError("fid_classifier needs labels and this dataset has none; use the Inception "
                            f"features (fid_extractor='inception', {INSTALL_HINT}) or give the images "
                            "class sub-folders")
        return [kind]
    names = (["inception"] if inception_available() else []) + (["classifier"] if has_labels else [])
    if not names:
        raise DataError(f"this dataset has no labels, so FID needs the Inception features: {INSTALL_HINT}")
    return names


def check_evaluation(kind: ExtractorKind, dataset: PreparedDataset | dict, num_samples: int) -> list[str]:
    """Everything about an evaluation that can be checked before training: the extractors, and a
    reference (the holdout split) at least as large as the sample count. Returns extractor_names."""
    manifest = dataset.manifest if isinstance(dataset, PreparedDataset) else dataset
    names = extractor_names(kind, manifest["has_labels"])
    holdout = manifest["splits"]["holdout"]
    if num_samples > holdout:
        raise FIDInputError(
            f"the FID reference (the holdout split) has {holdout} images, fewer than the {num_samples} "
            f"samples to score: sample at most {holdout} (sampling.num_images), or prepare a larger holdout "
            "(holdout_fraction, or split='official')")
    return names


def make_extractor(dataset: PreparedDataset, name: Literal["classifier", "inception"]) -> tuple[FeatureExtractor, dict]:
    """The feature extractor `name` and facts about it (classifier accuracy, cached or not).

    classifier: trained on the dataset's labelled train split, cached by the dataset fingerprint.
    """
    if name == "inception":
        return inception_extractor(), {}
    train_images, train_labels = dataset.split("train")
    holdout_images, holdout_labels = dataset.split("holdout")
    num_classes = len(dataset.manifest.get("class_names") or []) or int(dataset.labels.max()) + 1
    classifier, holdout_accuracy, was_cached = load_or_train_classifier(
        cache_dir(), dataset.fingerprint, train_images, train_labels, holdout_images, holdout_labels, num_classes
    )
    return classifier_extractor(classifier), {"classifier": classifier, "classifier_accuracy": holdout_accuracy,
                                              "classifier_cached": was_cached}


def floor_fid(extractor: FeatureExtractor, dataset: PreparedDataset, reference, n: int) -> float:
    """real_vs_real_fid at n, cached per (extractor weights, dataset fingerprint, n): with Inception
    it costs as much as scoring the samples, and it depends on nothing a run changes."""
    path = cache_dir() / f"fid-floor-{extractor.name}-{extractor.digest}-{dataset.fingerprint[:16]}-n{n}.json"
    try:
        return float(json.loads(path.read_text())["floor"])
    except (OSError, ValueError, KeyError):
        pass
    train, _ = dataset.split("train")
    floor = real_vs_real_fid(extractor, train, reference, n)
    tmp = path.with_suffix(f".tmp-{time.monotonic_ns()}")
    tmp.write_text(json.dumps({"floor": floor}))
    tmp.replace(path)   # atomic: concurrent runs never read half a file
    return floor


def load_samples(npz_path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images, the class each was asked to show, or None for unconditional samples)."""
    with np.load(npz_path) as data:
        labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
        return torch.from_numpy(data["images"]), labels


@dataclass
class Scoring:
    """What scoring samples of one dataset needs, built once: each extractor with its reference
    statistics (the holdout split), and the dataset's classifier when it has labels."""

    dataset: PreparedDataset
    extractors: dict[str, tuple[FeatureExtractor, object]]   # metric name -> (extractor, reference stats)
    facts: dict

    @classmethod
    def build(cls, dataset: PreparedDataset, names: list[str], conditional: bool = False) -> "Scoring":
        """Scoring with the extractors `names`; `conditional`: class-conditional samples, which
        the classifier checks even when its FID was not asked for."""
        holdout, _ = dataset.split("holdout")
        extractors, facts = {}, {}
        for extractor_name in names:
            feature_extractor, extractor_facts = make_extractor(dataset, extractor_name)
            reference = reference_statistics(feature_extractor, holdout, cache_dir(), dataset.fingerprint)
            extractors[metric_name("fid", feature_extractor)] = (feature_extractor, reference)
            facts.update(extractor_facts)
        if conditional and "classifier" not in facts and dataset.labels is not None:
            facts.update(make_extractor(dataset, "classifier")[1])
        return cls(dataset, extractors, facts)

    def score(self, samples: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict:
        """Every FID and its floor; with the classifier, its accuracy and the samples' mean
        confidence and class histogram; for class-conditional samples (`class_labels`) also the
        conditional accuracy and the per-class fid_classifier."""
        result = {}
        for name, (feature_extractor, reference) in self.extractors.items():
            result[name] = frechet_distance(feature_extractor, reference, samples)
            result[f"{name}_floor"] = floor_fid(feature_extractor, self.dataset, reference, len(samples))
        classifier = self.facts.get("classifier")
        if classifier is not None:
            summary = classifier_summary(classifier, samples)
            result.update(classifier_accuracy=self.facts["classifier_accuracy"],
                          sample_confidence=summary["mean_confidence"], class_histogram=summary["class_histogram"])
        if class_labels is not None and classifier is not None:
            result["conditional_accuracy"] = accuracy(classifier, samples, class_labels)
            result.update(self.per_class_fid(samples, class_labels))
        return result

    def per_class_fid(self, samples: torch.Tensor, class_labels: torch.Tensor) -> dict:
        """fid_classifier of each class's samples against the holdout images of that class, and
        their mean (classifier features only: Inception would need a second pass over the holdout)."""
        feature_extractor = classifier_extractor(self.facts["classifier"])
        holdout, holdout_labels = self.dataset.split("holdout")
        per_class = {}
        for k in class_labels.unique().tolist():
            real, generated = holdout[holdout_labels == k], samples[class_labels == k]
            if len(real) >= 2 and len(generated) >= 2:
                per_class[str(k)] = frechet_distance(feature_extractor, real, generated)
        if not per_class:
            return {}
        return {"fid_classifier_class_mean": float(np.mean(list(per_class.values()))), "fid_classifier_per_class": per_class}


@task
def warm_scoring_cache(dataset_path: str, extractor: ExtractorKind, num_samples: int) -> None:
    """Build what scoring samples of this dataset needs (the classifier, the reference statistics,
    the FID floors at `num_samples`) into the on-disk cache, once: pipelines that then run side
    by side, in threads or other processes, load it instead of each building it."""
    dataset = load_prepared(Path(dataset_path))
    scoring = Scoring.build(dataset, check_evaluation(extractor, dataset, num_samples))
    for feature_extractor, reference in scoring.extractors.values():
        floor_fid(feature_extractor, dataset, reference, num_samples)


@task(retries=1, retry_delay_seconds=2)
def evaluate_samples(
    samples_npz: str,
    dataset_path: str,
    run_id: str | None = None,
    step: int = 0,
    extractor: ExtractorKind = "auto",
    model_id: str | None = None,
) -> dict:
    """FIDs of the samples in `samples_npz` against the dataset's holdout split, plus their floors.

    Logs `fid_<extractor>` and `fid_<extractor>_floor` for each extractor at `step` to MLflow run
    `run_id` (linked to its logged model `model_id`, when given), the tags `fid.metric` (the
    primary one) and `fid.num_samples`; with the classifier, also its accuracy, the mean
    confidence on the samples and a class histogram. Samples of a class-conditional model (the
    npz holds their `labels`) add `conditional_accuracy` (the share the classifier assigns to
    the class asked for) and the per-class fid_classifier (`fid_classifier_class_mean`, each
    class in evaluation/per_class_fid-<step>.json).
    """
    dataset = load_prepared(Path(dataset_path))
    samples, class_labels = load_samples(samples_npz)
    names = check_evaluation(extractor, dataset, len(samples))
    scoring = Scoring.build(dataset, names, conditional=class_labels is not None)
    result = {"metric": metric_name("fid", names[0]), "metrics": list(scoring.extractors),
              "num_samples": len(samples), "step": step, **scoring.score(samples, class_labels)}
    if run_id:
        metrics = {k: v for k, v in result.items() if isinstance(v, float)}
        mlflow_client = tracking.client()
        mlflow_client.log_batch(run_id, metrics=[
            tracking.Metric(k, v, int(time.time() * 1000), step, model_id=model_id) for k, v in metrics.items()
        ])
        mlflow_client.set_tag(run_id, "fid.metric", result["metric"])
        mlflow_client.set_tag(run_id, "fid.num_samples", str(len(samples)))
        if "fid_classifier_per_class" in result:
            tracking.log_dict(run_id, result["fid_classifier_per_class"],
                              f"evaluation/per_class_fid-{step:07d}.json")
        if "class_histogram" in result:
            with tempfile.TemporaryDirectory() as tmp:
                with plots.RENDER_LOCK:  # matplotlib text layout is not thread-safe
                    path = plot_class_histogram(result["class_histogram"], dataset.manifest.get("class_names"),
                                                Path(tmp) / f"class_histogram-{step:07d}.png")
                tracking.log_file(run_id, path, "evaluation")
    return result


# The guidance scales a class-conditional run is scored at (0 unconditional, 1 conditional; 1.5
# the default, ddpm.guidance.DEFAULT_GUIDANCE_SCALE).
GUIDANCE_SWEEP = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)


@task
def guidance_sweep(
    checkpoint: str,
    sampling: SamplerConfig,
    dataset_path: str,
    run_id: str | None = None,
    scales: tuple[float, ...] = GUIDANCE_SWEEP,
    extractor: ExtractorKind = "auto",
) -> dict:
    """Sample a class-conditional checkpoint at each guidance scale and score each set: FIDs and
    conditional accuracy against w. With `run_id`, logged as the table evaluation/guidance_sweep.json,
    the plot plots/guidance_sweep.png and the tag `guidance.best_scale` (the lowest primary FID)."""
    dataset = load_prepared(Path(dataset_path))
    names = check_evaluation(extractor, dataset, sampling.num_images)
    scoring = Scoring.build(dataset, names, conditional=True)
    metric = metric_name("fid", names[0])
    # the model is loaded once; the sampler does not depend on the guidance scale
    model, sampler, step = load_sampler(checkpoint, sampling)
    if model.config.num_classes is None:
        raise ValueError("the guidance sweep needs a class-conditional model; this checkpoint is unconditional")
    rows = []
    for scale in progress_bar(list(scales), desc="guidance sweep", unit="w"):
        images, class_labels = draw_images(model, sampler, SamplerConfig(**{**sampling.model_dump(),
                                                                           "guidance_scale": scale}), "cpu")
        scores = scoring.score(images, class_labels)
        rows.append({"guidance_scale": scale, **{name: scores[name] for name in scoring.extractors},
                     "conditional_accuracy": scores.get("conditional_accuracy"),
                     "fid_classifier_class_mean": scores.get("fid_classifier_class_mean")})
    best = min(rows, key=lambda r: r[metric])
    if run_id:
        mlflow_client = tracking.client()
        mlflow_client.log_table(run_id, data={key: [r[key] for r in rows] for key in rows[0]},
                                artifact_file="evaluation/guidance_sweep.json")
        plots.log_figure(run_id, lambda: plots.guidance_sweep_plot(rows, metric), "plots/guidance_sweep.png")
        mlflow_client.set_tag(run_id, "guidance.best_scale", f"{best['guidance_scale']:g}")
    return {"metric": metric, "rows": rows, "best_scale": best["guidance_scale"], "step": step}

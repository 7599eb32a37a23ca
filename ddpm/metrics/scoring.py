"""Scoring samples of one dataset: every FID it can have, each beside its real-vs-real floor.

    names = check_evaluation("auto", dataset, num_samples)    # before any training: the extractors, the reference size
    scorer = Scorer.build(dataset, names, cache_dir)          # extractors + reference statistics, built once
    scorer.score(samples)                                     # {"fid_inception": .., "fid_inception_floor": .., ...}

The pipeline's evaluation tasks and the benchmarks call this one scorer. FID is

    FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

between the feature statistics of the reference (the dataset's holdout split) and of the samples
(ddpm.metrics.fid). Metric names carry the extractor (`fid_inception`, `fid_classifier`), so
numbers measured with different features are never compared. The extractor kinds are
EXTRACTOR_KINDS: "inception" (the standard, comparable with papers; the `inception` extra),
"classifier" (the dataset's own classifier; labelled data), "auto" (every one the data allows,
Inception first: the first is the primary metric). The floor is the FID of as many real train
images as samples against the same reference: what a perfect model scores with that many samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ddpm.data import DataError, PreparedDataset
from ddpm.metrics.classifier import DigitClassifier, accuracy, load_or_train_classifier
from ddpm.metrics.extractors import INSTALL_HINT, inception_available, inception_weights
from ddpm.metrics.fid import (FeatureExtractor, FIDInputError, ReferenceStats, classifier_extractor,
                              classifier_summary, frechet_distance, inception_extractor, metric_name,
                              real_vs_real_fid, reference_statistics)

# The one list of extractor kinds: the config's type, the CLI's choices and the checks read it.
EXTRACTOR_KINDS = ("auto", "classifier", "inception")
ExtractorKind = Literal[EXTRACTOR_KINDS]


def extractor_names(kind: ExtractorKind, has_labels: bool) -> list[str]:
    """The feature extractors an evaluation uses, the primary one first; raises before any work
    when one that was asked for cannot run (the extra missing, a damaged file, no labels)."""
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown FID feature extractor {kind!r}; choose one of {', '.join(EXTRACTOR_KINDS)}")
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


def load_samples(npz_path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images, the class each was asked to show, or None for unconditional samples) of a
    samples file (ddpm.sampling.save_samples)."""
    with np.load(npz_path) as data:
        labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
        return torch.from_numpy(data["images"]), labels


@dataclass
class Scorer:
    """What scoring samples of one dataset needs, built once: each extractor with its reference
    statistics (the holdout split), the dataset's classifier when it has labels, and the cache
    folder (classifier weights, reference statistics, floors; keyed by the dataset fingerprint)."""

    dataset: PreparedDataset
    extractors: dict[str, tuple[FeatureExtractor, ReferenceStats]]   # metric name -> (extractor, reference)
    facts: dict   # classifier, classifier_accuracy, classifier_cached (with labels)
    cache_dir: Path

    @classmethod
    def build(cls, dataset: PreparedDataset, names: list[str], cache_dir: Path | str,
              conditional: bool = False) -> Scorer:
        """A scorer with the extractors `names` (the primary first); `conditional`: class-conditional
        samples, which the classifier checks even when its FID was not asked for."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        holdout, _ = dataset.split("holdout")
        extractors, facts = {}, {}
        for name in names:
            feature_extractor, extractor_facts = make_extractor(dataset, name, cache_dir)
            reference = reference_statistics(feature_extractor, holdout, cache_dir, dataset.fingerprint)
            extractors[metric_name(feature_extractor)] = (feature_extractor, reference)
            facts.update(extractor_facts)
        if conditional and "classifier" not in facts and dataset.labels is not None:
            facts.update(make_extractor(dataset, "classifier", cache_dir)[1])
        return cls(dataset, extractors, facts, cache_dir)

    @property
    def primary(self) -> str:
        """The first metric: what a run ranks by."""
        return next(iter(self.extractors))

    @property
    def classifier(self) -> DigitClassifier | None:
        return self.facts.get("classifier")

    @property
    def classifier_accuracy(self) -> float | None:
        return self.facts.get("classifier_accuracy")

    def fids(self, samples: torch.Tensor) -> dict[str, float]:
        """Every FID of `samples` (uint8 N, C, H, W), by metric name."""
        return {name: frechet_distance(extractor, reference, samples)
                for name, (extractor, reference) in self.extractors.items()}

    def fid(self, samples: torch.Tensor, metric: str | None = None) -> float:
        """One FID of `samples`: `metric`, by default the primary one."""
        extractor, reference = self.extractors[metric or self.primary]
        return frechet_distance(extractor, reference, samples)

    def floors(self, n: int) -> dict[str, float]:
        """Every metric's real-vs-real floor at `n` samples."""
        return {name: self.floor(n, name) for name in self.extractors}

    def floor(self, n: int, metric: str | None = None) -> float:
        """real_vs_real_fid at n, cached per (extractor weights, dataset fingerprint, n): with
        Inception it costs as much as scoring the samples, and it depends on nothing a run changes."""
        extractor, reference = self.extractors[metric or self.primary]
        path = self.cache_dir / f"fid-floor-{extractor.name}-{extractor.digest}-{self.dataset.fingerprint[:16]}-n{n}.json"
        try:
            return float(json.loads(path.read_text())["floor"])
        except (OSError, ValueError, KeyError):
            pass
        train, _ = self.dataset.split("train")
        floor = real_vs_real_fid(extractor, train, reference, n)
        tmp = path.with_suffix(f".tmp-{time.monotonic_ns()}")
        tmp.write_text(json.dumps({"floor": floor}))
        tmp.replace(path)   # atomic: concurrent runs never read half a file
        return floor

    def score(self, samples: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict:
        """Every FID and its floor; with the classifier, its accuracy and the samples' mean
        confidence and class histogram; for class-conditional samples (`class_labels`) also the
        conditional accuracy and the per-class fid_classifier."""
        result = {}
        for name, value in self.fids(samples).items():
            result[name] = value
            result[f"{name}_floor"] = self.floor(len(samples), name)
        classifier = self.classifier
        if classifier is not None:
            summary = classifier_summary(classifier, samples)
            result.update(classifier_accuracy=self.classifier_accuracy,
                          sample_confidence=summary["mean_confidence"], class_histogram=summary["class_histogram"])
        if class_labels is not None and classifier is not None:
            result["conditional_accuracy"] = accuracy(classifier, samples, class_labels)
            result.update(self.per_class_fid(samples, class_labels))
        return result

    def per_class_fid(self, samples: torch.Tensor, class_labels: torch.Tensor) -> dict:
        """fid_classifier of each class's samples against the holdout images of that class, and
        their mean (classifier features only: Inception would need a second pass over the holdout)."""
        feature_extractor = classifier_extractor(self.classifier)
        holdout, holdout_labels = self.dataset.split("holdout")
        per_class = {}
        for k in class_labels.unique().tolist():
            real, generated = holdout[holdout_labels == k], samples[class_labels == k]
            if len(real) >= 2 and len(generated) >= 2:
                per_class[str(k)] = frechet_distance(feature_extractor, real, generated)
        if not per_class:
            return {}
        return {"fid_classifier_class_mean": float(np.mean(list(per_class.values()))), "fid_classifier_per_class": per_class}


def make_extractor(dataset: PreparedDataset, name: Literal["classifier", "inception"],
                   cache_dir: Path) -> tuple[FeatureExtractor, dict]:
    """The feature extractor `name` and facts about it (classifier accuracy, cached or not).

    classifier: trained on the dataset's labelled train split, cached in `cache_dir` by the
    dataset fingerprint.
    """
    if name == "inception":
        return inception_extractor(), {}
    train_images, train_labels = dataset.split("train")
    holdout_images, holdout_labels = dataset.split("holdout")
    num_classes = len(dataset.manifest.get("class_names") or []) or int(dataset.labels.max()) + 1
    classifier, holdout_accuracy, was_cached = load_or_train_classifier(
        cache_dir, dataset.fingerprint, train_images, train_labels, holdout_images, holdout_labels, num_classes
    )
    return classifier_extractor(classifier), {"classifier": classifier, "classifier_accuracy": holdout_accuracy,
                                              "classifier_cached": was_cached}

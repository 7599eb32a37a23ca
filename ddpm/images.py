"""Converting model outputs to pictures: [-1, 1] floats -> uint8 -> grids -> PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 in [0, 255], rounding to the nearest level."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 in [-1, 1]: the inverse of `to_uint8` (up to rounding)."""
    return images_uint8.float() / 127.5 - 1.0


def make_grid(images_uint8: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) uint8 images into one (rows*H, cols*W, C) uint8 array, row by row."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"make_grid expects uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    n, c, h, w = images_uint8.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    array = images_uint8.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = array[i]
    return grid


def save_png(array_hwc: np.ndarray, path: Path | str, scale: int = 1) -> Path:
    """Write an (H, W, C) uint8 array as PNG, enlarged `scale` times with nearest neighbours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array_hwc[..., 0] if array_hwc.shape[-1] == 1 else array_hwc)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def save_grid(images: Tensor, path: Path | str, nrow: int | None = None, scale: int = 1) -> Path:
    """Images in [-1, 1] or uint8 -> one PNG grid."""
    images_uint8 = images if images.dtype == torch.uint8 else to_uint8(images)
    return save_png(make_grid(images_uint8, nrow=nrow), path, scale=scale)

"""Fit uint8 image arrays to the model's channels and size.

One implementation serves every source, so a folder of PNGs and an IDX file that hold the
same pixels give the same prepared bytes.

Policies (`resize`):
  - "resize":      stretch to image_size x image_size (aspect ratio not kept), bilinear.
  - "center_crop": cut the largest centred square, then bilinear to image_size x image_size
                   (aspect ratio kept; the border of the long side is lost).
  - "pad":         no resampling: each image centred on a black image_size x image_size canvas
                   (MNIST 28x28 -> 32x32 keeps every pixel; images larger than image_size are refused).
  - "none":        no resampling: every image must already be image_size x image_size.
Bilinear uses torch's antialiased kernel (align_corners=False), so shrinking (MNIST 28 -> 16)
averages pixels instead of aliasing. Values are rounded and clamped back to uint8.

Channels: gray -> RGB repeats the gray plane; RGB -> gray is ITU-R 601-2 luma
(L = 0.299 R + 0.587 G + 0.114 B, the formula PIL's convert("L") uses).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

RESIZE_POLICIES = ("resize", "center_crop", "pad", "none")
_LUMA = (0.299, 0.587, 0.114)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, C_in, H, W) uint8 -> (N, channels, H, W) uint8; returns the input when C_in == channels."""
    c_in = images.shape[1]
    if c_in == channels:
        return images
    if c_in == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c_in == 3 and channels == 1:
        x = images.astype(np.float32)
        luma = _LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, None]
    raise DataError(f"cannot convert {c_in}-channel images to {channels} channels")


def center_square(images: np.ndarray) -> np.ndarray:
    """The largest centred square of (N, C, H, W) images (a view, no copy)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top:top + side, left:left + side]


def pad_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, C, H, W) centred on a zero (black) (N, C, image_size, image_size) canvas; an odd margin
    puts the extra pixel after the image (bottom, right)."""
    n, c, h, w = images.shape
    if h > image_size or w > image_size:
        raise DataError(f"images are {h}x{w}, larger than image_size={image_size}: resize='pad' only adds "
                        f"a border; choose resize='center_crop' or 'resize', or image_size>={max(h, w)}")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    out = np.zeros((n, c, image_size, image_size), dtype=np.uint8)
    out[:, :, top:top + h, left:left + w] = images
    return out


def fit_images(images: np.ndarray, image_size: int, channels: int, resize: str,
               chunk: int = 4096) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, channels, image_size, image_size) uint8 under the `resize` policy.

    Returns the input array itself when nothing changes (no copy of CIFAR-10 at 32x32x3);
    otherwise fills one preallocated output chunk by chunk, so peak memory is the input,
    the output and one chunk in float.
    """
    if resize not in RESIZE_POLICIES:
        raise DataError(f"resize={resize!r} is not one of {RESIZE_POLICIES}")
    n, _, h, w = images.shape
    if resize == "none" and (h, w) != (image_size, image_size):
        raise DataError(f"images are {h}x{w} but image_size={image_size} and resize='none': "
                        f"choose resize='resize' or 'center_crop', or image_size={h}")
    if resize == "pad":
        return pad_images(convert_channels(np.ascontiguousarray(images), channels), image_size)
    if resize == "center_crop":
        images = center_square(images)
    if images.shape[-2:] == (image_size, image_size):
        return convert_channels(np.ascontiguousarray(images), channels)
    out = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    for start in range(0, n, chunk):
        part = convert_channels(np.ascontiguousarray(images[start:start + chunk]), channels)
        x = torch.from_numpy(part).float()
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[start:start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out

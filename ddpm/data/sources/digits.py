"""scikit-learn's 8x8 digits: 1,797 images of 10 classes, shipped with scikit-learn (no download)."""
from __future__ import annotations

import numpy as np

from .base import Source, SourceData, select_and_fit


def read_digits(location, config, mirrors=None, checksums=None) -> SourceData:
    """scikit-learn's 1,797 8x8 digits (values 0..16) scaled to uint8 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    images, labels, _ = select_and_fit(images, labels, config)
    return SourceData(images, labels, [str(i) for i in range(10)], {"origin": "sklearn.load_digits"})


def digits_identity(location, checksums=None) -> dict:
    import sklearn
    return {"kind": "digits", "sklearn": sklearn.__version__}


SOURCE = Source("digits", "none", read_digits, digits_identity)

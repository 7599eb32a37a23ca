"""MNIST: the IDX files (gz or raw) of a folder, downloaded (md5-verified) when it holds none."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .base import Source, SourceData, download, expected_md5, select_and_fit, stat_entry, verify_md5

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

def _mnist_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist_present_splits(folder: Path) -> dict[str, tuple[Path, Path]]:
    """The splits whose images and labels files are both in `folder` (gz or raw)."""
    present = {}
    for split, (images_stem, labels_stem) in MNIST_SPLITS.items():
        images, labels = _mnist_file(folder, images_stem), _mnist_file(folder, labels_stem)
        if images is not None and labels is not None:
            present[split] = (images, labels)
    return present


def read_idx(path: Path, magic: int, checksums: dict | None) -> np.ndarray:
    """One IDX file (gz or raw) -> uint8 array, after its md5 check and a header check."""
    verify_md5(path, expected_md5(path.name, path.parent, checksums, MNIST_MD5))
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file with magic {magic:#010x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes of data, "
                        f"file holds {len(raw) - header} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def ensure_mnist(folder: Path, mirrors: Sequence[str] | None, checksums: dict | None):
    """The present splits of `folder`, downloading all four .gz files when none is present."""
    present = mnist_present_splits(folder)
    if not present:
        for name in MNIST_MD5:
            if not (folder / name).is_file():
                download(name, folder, mirrors or MNIST_MIRRORS,
                         expected_md5(name, folder, checksums, MNIST_MD5))
        present = mnist_present_splits(folder)
    return present


def read_mnist(folder: Path, config, mirrors=None, checksums=None) -> SourceData:
    """MNIST IDX files from `folder`; all present splits concatenated (train first)."""
    present = ensure_mnist(folder, mirrors, checksums)
    images, labels = [], []
    for split, (images_path, labels_path) in present.items():
        x = read_idx(images_path, 0x00000803, checksums)
        y = read_idx(labels_path, 0x00000801, checksums)
        if len(x) != len(y):
            raise DataError(f"{images_path} holds {len(x)} images but {labels_path} {len(y)} labels")
        images.append(x)
        labels.append(y.astype(np.int64))
    x = np.concatenate(images)[:, None]
    y = np.concatenate(labels)
    test = np.concatenate([np.full(len(i), split == "t10k") for split, i in zip(present, images)])
    details = {"folder": str(folder), "splits": {s: int(len(i)) for s, i in zip(present, images)}}
    x, y, test = select_and_fit(x, y, config, test)
    return SourceData(x, y, [str(i) for i in range(10)], details, official_holdout=test)



def mnist_identity(folder: Path, checksums: dict | None = None) -> dict:
    """The present files by md5 (verified on read), or the md5s of the files still to download."""
    present = mnist_present_splits(folder)
    if not present:
        return {"kind": "mnist", "download": {n: expected_md5(n, folder, checksums, MNIST_MD5) for n in MNIST_MD5}}
    return {"kind": "mnist", "files": [
        [f.name, md5] if (md5 := expected_md5(f.name, f.parent, checksums, MNIST_MD5)) else stat_entry(f, f.parent)
        for pair in present.values() for f in pair]}


SOURCE = Source("mnist[:DIR]", "optional", read_mnist, mnist_identity, downloads=True)

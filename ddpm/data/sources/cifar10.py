"""CIFAR-10: the python-pickle archive (or its extracted batches), downloaded when absent, read by an
unpickler that loads arrays and never code."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Source, SourceData, download, expected_md5, select_and_fit, stat_entry, verify_md5

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
# The archive's published md5 (cs.toronto.edu), and the extracted files' (the sums torchvision checks).
CIFAR10_MD5 = {CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a",
               "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
               "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
               "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                   "test_batch")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")

def _cifar_location(path: Path, mirrors, checksums) -> Path:
    """The archive or extracted batches folder that `path` designates (downloading if needed)."""
    if path.is_file():
        return path
    if (path / "data_batch_1").is_file() or (path / "test_batch").is_file():
        return path
    if (path / "cifar-10-batches-py").is_dir():
        return path / "cifar-10-batches-py"
    if not (path / CIFAR10_ARCHIVE).is_file():
        download(CIFAR10_ARCHIVE, path, mirrors or CIFAR10_MIRRORS,
                 expected_md5(CIFAR10_ARCHIVE, path, checksums, CIFAR10_MD5))
    return path / CIFAR10_ARCHIVE


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and nothing that could run code: a crafted
    batch naming any other callable (os.system, ...) is refused instead of executed."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR-10 batch holds only arrays)")
        return super().find_class(module, name)


def _cifar_batches(location: Path, checksums=None):
    """Yield (name, dict) for each batch, one at a time (a streaming pass over the archive).

    Extracted batches are md5-verified before they are read (the archive was, as a whole); either
    way they are read by ArrayUnpickler, which loads data and never code.
    """
    def load(f, name):
        try:
            return ArrayUnpickler(f, encoding="bytes").load()
        except Exception as exc:
            raise DataError(f"cannot unpickle CIFAR-10 batch {name} in {location}: {exc}") from exc

    if location.is_dir():
        for name in CIFAR10_BATCHES + ("batches.meta",):
            if (location / name).is_file():
                verify_md5(location / name, expected_md5(name, location, checksums, CIFAR10_MD5))
                with open(location / name, "rb") as f:
                    yield name, load(f, name)
        return
    try:
        with tarfile.open(location, "r|gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in CIFAR10_BATCHES + ("batches.meta",):
                    yield name, load(io.BufferedReader(tar.extractfile(member)), name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-10 archive {location}: {exc}") from exc


def read_cifar10(path: Path, config, mirrors=None, checksums=None) -> SourceData:
    """CIFAR-10 batches into one preallocated uint8 array (a single copy of the images)."""
    location = _cifar_location(path, mirrors, checksums)
    if location.is_file():
        verify_md5(location, expected_md5(location.name, location.parent, checksums, CIFAR10_MD5))
    images = labels = None
    count, seen, class_names = 0, {}, list(CIFAR10_CLASSES)
    for name, batch in _cifar_batches(location, checksums):
        if name == "batches.meta":
            class_names = [n.decode() for n in batch.get(b"label_names", [])] or class_names
            continue
        data, y = batch.get(b"data"), batch.get(b"labels")
        if data is None or y is None or data.ndim != 2 or data.shape[1] != 3072 or len(y) != len(data):
            raise DataError(f"CIFAR-10 batch {name} in {location} is not 3072-byte rows with labels")
        if images is None:   # standard batches are equal-sized: room for all six
            images = np.empty((len(data) * len(CIFAR10_BATCHES), 3, 32, 32), dtype=np.uint8)
            labels = np.empty(len(images), dtype=np.int64)
        if count + len(data) > len(images):   # non-standard sizes only: grow
            images = np.concatenate([images, np.empty_like(images)])
            labels = np.concatenate([labels, np.empty_like(labels)])
        images[count:count + len(data)] = data.reshape(-1, 3, 32, 32)
        labels[count:count + len(data)] = y
        seen[name] = len(data)
        count += len(data)
        del data, batch   # drop this batch before the next is read
    if not count:
        raise DataError(f"no CIFAR-10 batches found in {location}")
    images, labels = images[:count], labels[:count]
    test = np.concatenate([np.full(n, name == "test_batch") for name, n in seen.items()])
    details = {"location": str(location), "batches": seen,
               "splits": {s: n for s, n in (("train", count - seen.get("test_batch", 0)),
                                            ("test", seen.get("test_batch", 0))) if n}}
    images, labels, test = select_and_fit(images, labels, config, test)
    return SourceData(images, labels, class_names, details, official_holdout=test)



def cifar10_identity(path: Path, checksums: dict | None = None) -> dict:
    """The archive by md5, else the extracted batches by name, size and mtime, else the md5 of
    the archive still to download."""
    if path.is_file():
        md5 = expected_md5(path.name, path.parent, checksums, CIFAR10_MD5)
        return {"kind": "cifar10", "files": [[path.name, md5] if md5 else stat_entry(path, path.parent)]}
    batches = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    found = [batches / n for n in CIFAR10_BATCHES if (batches / n).is_file()]
    if found:
        return {"kind": "cifar10", "files": [stat_entry(f, batches) for f in found]}
    return {"kind": "cifar10", "files": [[CIFAR10_ARCHIVE, expected_md5(CIFAR10_ARCHIVE, path, checksums, CIFAR10_MD5)]]}


SOURCE = Source("cifar10[:PATH]", "optional", read_cifar10, cifar10_identity, downloads=True)

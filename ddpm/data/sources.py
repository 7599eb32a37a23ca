"""Image sources: read raw data into uint8 arrays (N, C, H, W), verify checksums, download.

Source strings (DataConfig.source):
  - "digits"          the 8x8 digits scikit-learn ships (no download).
  - "mnist[:DIR]"     the IDX files (gz or raw) in DIR; every split present (train and/or
                      t10k) is used, concatenated train first (t10k is the official holdout). When DIR holds no split at all,
                      the four .gz files are downloaded into it. Without DIR: <download_dir>/mnist.
  - "cifar10[:PATH]"  the python-pickle archive cifar-10-python.tar.gz (PATH is the archive, a
                      folder holding it, or the extracted cifar-10-batches-py folder); all
                      batches present are used (data_batch_1..5 then test_batch). Downloaded
                      when absent. Without PATH: <download_dir>/cifar10.
  - "folder:DIR"      PNG/JPEG files in DIR (recursively). When every image sits in an immediate
                      sub-folder, the sub-folder names are the classes (sorted) and give labels.

Checksums: a file's expected md5 comes from, in order, the `checksums` argument, an MD5SUMS
file in its folder (`md5  name` lines), then the published sums. A file with an expected sum
is always verified (extracted CIFAR batches against the sums torchvision publishes); raw
(un-gzipped) IDX files have no published sum and are checked structurally (magic numbers,
sizes). CIFAR batches are pickles: they are read by an unpickler that loads arrays and never code.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError
from .images import fit_images

SOURCE_KINDS = ("digits", "mnist", "cifar10", "folder")

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class SourceData:
    """What a source yields, already fitted to the configured size and channels."""
    images: np.ndarray                 # uint8 (N, C, H, W)
    labels: np.ndarray | None          # int64 (N,) or None
    class_names: list[str] | None
    details: dict = field(default_factory=dict)   # what was read (files, splits), for the manifest
    official_holdout: np.ndarray | None = None   # bool (N,): in the source's own test split; None: it has none


def parse_source(source: str) -> tuple[str, Path | None]:
    """'kind' or 'kind:path' -> (kind, path or None); DataError for an unknown kind."""
    kind, sep, rest = source.partition(":")
    if kind not in SOURCE_KINDS:
        raise DataError(f"unknown source {source!r}: expected one of 'digits', 'mnist[:DIR]', "
                        "'cifar10[:PATH]', 'folder:DIR'")
    if kind == "digits" and sep:
        raise DataError(f"source {source!r}: 'digits' takes no path")
    if kind == "folder" and not rest:
        raise DataError(f"source {source!r}: 'folder:' needs a path, e.g. 'folder:/data/faces'")
    return kind, (Path(rest).expanduser() if rest else None)


# ---------------------------------------------------------------------------- checksums

def file_digest(path: Path, algorithm: str = "md5", block: int = 1 << 20) -> str:
    """Hex digest of a file (any hashlib algorithm), read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")


def read_md5sums(folder: Path) -> dict[str, str]:
    """The `md5  name` lines of folder/MD5SUMS, or {} when there is none."""
    sums = {}
    path = folder / "MD5SUMS"
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def expected_md5(name: str, folder: Path, checksums: dict | None, published: dict) -> str | None:
    """The md5 a file must have: injected, else folder MD5SUMS, else published, else None."""
    for table in (checksums or {}, read_md5sums(folder), published):
        if name in table:
            return table[name]
    return None


def verify_md5(path: Path, expected: str | None) -> None:
    """DataError naming the file when its md5 differs from `expected` (None: nothing to check)."""
    if expected is None:
        return
    actual = md5_file(path)
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}")


def download(name: str, folder: Path, mirrors: Sequence[str], md5: str | None) -> Path:
    """Fetch `name` from the first mirror that serves it into folder/name, md5-verified.

    Writes to a .part file and renames only after the checksum matched, so an interrupted or
    corrupt download never leaves a file that looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest, part = folder / name, folder / (name + ".part")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            verify_md5(part, md5)
            os.replace(part, dest)
            return dest
        except (OSError, DataError) as exc:   # URLError and HTTPError are OSErrors
            failures.append(f"{url}: {exc}")
            part.unlink(missing_ok=True)
    raise DataError(f"could not download {name} into {folder}: " + "; ".join(failures))


# ---------------------------------------------------------------------------- helpers

def subset_indices(n: int, max_images: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded random subset of range(n) of size max_images (None: keep all)."""
    if max_images is None or max_images >= n:
        return None
    rng = np.random.default_rng([seed, 0x5EB])   # its own stream: independent of the split's
    return np.sort(rng.choice(n, size=max_images, replace=False))


def _select_and_fit(images, labels, config, official_holdout=None):
    """(images, labels, official_holdout) of the max_images subset, images fitted to the config."""
    keep = subset_indices(len(images), config.max_images, config.split_seed)
    if keep is not None:
        images = images[keep]
        labels = labels[keep] if labels is not None else None
        official_holdout = official_holdout[keep] if official_holdout is not None else None
    return fit_images(images, config.image_size, config.channels, config.resize), labels, official_holdout


# ---------------------------------------------------------------------------- digits

def read_digits(config) -> SourceData:
    """scikit-learn's 1,797 8x8 digits (values 0..16) scaled to uint8 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    images, labels, _ = _select_and_fit(images, labels, config)
    return SourceData(images, labels, [str(i) for i in range(10)], {"origin": "sklearn.load_digits"})


# ---------------------------------------------------------------------------- mnist

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
    x, y, test = _select_and_fit(x, y, config, test)
    return SourceData(x, y, [str(i) for i in range(10)], details, official_holdout=test)


# ---------------------------------------------------------------------------- cifar10

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
    images, labels, test = _select_and_fit(images, labels, config, test)
    return SourceData(images, labels, class_names, details, official_holdout=test)


# ---------------------------------------------------------------------------- folder

def list_folder_images(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Image files under `folder` (sorted) and class names when laid out as class sub-folders."""
    if not folder.exists():
        raise DataError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    all_files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not all_files:
        raise DataError(f"folder {folder} is empty")
    files = [p for p in all_files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no PNG/JPEG image files in {folder} ({len(all_files)} other files, "
                        f"e.g. {all_files[0].name})")
    depths = {len(p.relative_to(folder).parts) for p in files}
    class_names = sorted({p.relative_to(folder).parts[0] for p in files}) if depths == {2} else None
    return files, class_names


MIN_IMAGE_SIDE = 4   # smaller "images" (icons, 1x1 pixels) are refused, not silently blown up


def _decode(path: Path, channels: int) -> np.ndarray:
    """One image file -> (C, H, W) uint8; DataError naming the file when it cannot be read.

    16-bit gray (PIL modes I;16*, I) is scaled to 8 bits (x / 257, rounded): PIL's own
    convert("L") clips it, turning every 16-bit image white.
    """
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.load()   # decode now: a truncated file raises here, not later
            if img.mode.startswith("I"):
                wide = np.array(img).astype(np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise DataError(f"image {path} holds {img.mode} values outside 0..65535")
                img = Image.fromarray(np.rint(wide / 257).astype(np.uint8), mode="L")
            img = img.convert("L" if channels == 1 else "RGB")   # alpha is dropped
            array = np.array(img)   # a writable copy
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise DataError(f"image {path} is {array.shape[0]}x{array.shape[1]}: smaller than {MIN_IMAGE_SIDE} px on a "
                        "side, too small to train on; remove it from the folder")
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_folder(folder: Path, config) -> SourceData:
    """Decode, convert and fit every image of a folder into one (N, C, S, S) uint8 array."""
    files, class_names = list_folder_images(folder)
    keep = subset_indices(len(files), config.max_images, config.split_seed)
    if keep is not None:
        files = [files[i] for i in keep]
    size = config.image_size
    if config.resize == "none":   # check every size first, so the message lists the mix
        from PIL import Image
        sizes = {}
        for path in files:
            try:
                with Image.open(path) as img:
                    sizes.setdefault(img.size[::-1], path.name)
            except Exception as exc:
                raise DataError(f"cannot read image {path}: {exc}") from exc
        if len(sizes) > 1:
            mix = ", ".join(f"{h}x{w} (e.g. {name})" for (h, w), name in sorted(sizes.items()))
            raise DataError(f"images in {folder} have mixed sizes {mix} and resize='none': "
                            "choose resize='resize' or 'center_crop'")
    images = np.empty((len(files), config.channels, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        images[i] = fit_images(_decode(path, config.channels)[None], size, config.channels,
                               config.resize)[0]
    labels = None
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.relative_to(folder).parts[0]] for p in files], dtype=np.int64)
    return SourceData(images, labels, class_names, {"folder": str(folder), "files": len(files)})


# ---------------------------------------------------------------------------- dispatch

def default_location(kind: str, path: Path | None, download_dir: Path) -> Path | None:
    return path if path is not None or kind in ("digits", "folder") else download_dir / kind


def read_source(config, download_dir: Path, mirrors=None, checksums=None) -> SourceData:
    """Read the configured source, fitted to (channels, image_size, image_size)."""
    kind, path = parse_source(config.source)
    path = default_location(kind, path, download_dir)
    if kind == "digits":
        return read_digits(config)
    if kind == "mnist":
        return read_mnist(path, config, mirrors, checksums)
    if kind == "cifar10":
        return read_cifar10(path, config, mirrors, checksums)
    return read_folder(path, config)


def _stat_entry(path: Path, root: Path) -> list:
    st = path.stat()
    return [str(path.relative_to(root)), st.st_size, st.st_mtime_ns]


def source_identity(source: str, download_dir: Path, checksums: dict | None = None) -> dict:
    """What identifies the source's content without reading it all.

    A file with an expected md5 is identified by that md5 (it is verified on read, so a changed
    file fails loudly); other files by name, size and mtime. Files still to be downloaded are
    identified by their expected md5s, so the identity is the same before and after download.
    """
    kind, path = parse_source(source)
    path = default_location(kind, path, download_dir)
    if kind == "digits":
        import sklearn
        return {"kind": "digits", "sklearn": sklearn.__version__}

    def entry(file: Path, published: dict) -> list:
        md5 = expected_md5(file.name, file.parent, checksums, published)
        return [file.name, md5] if md5 else _stat_entry(file, file.parent)

    if kind == "mnist":
        present = mnist_present_splits(path)
        if not present:
            return {"kind": "mnist", "download": {n: expected_md5(n, path, checksums, MNIST_MD5)
                                                  for n in MNIST_MD5}}
        return {"kind": "mnist", "files": [entry(f, MNIST_MD5) for pair in present.values() for f in pair]}
    if kind == "cifar10":
        if path.is_file():
            return {"kind": "cifar10", "files": [entry(path, CIFAR10_MD5)]}
        batches = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        found = [batches / n for n in CIFAR10_BATCHES if (batches / n).is_file()]
        if found:
            return {"kind": "cifar10", "files": [_stat_entry(f, batches) for f in found]}
        return {"kind": "cifar10",
                "files": [[CIFAR10_ARCHIVE, expected_md5(CIFAR10_ARCHIVE, path, checksums, CIFAR10_MD5)]]}
    files, _ = list_folder_images(path)
    listing = hashlib.sha256(repr([_stat_entry(f, path) for f in files]).encode()).hexdigest()
    return {"kind": "folder", "path": str(path.resolve()), "files": len(files), "listing_sha256": listing}

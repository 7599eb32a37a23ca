"""What every data source shares: the data it yields, its registry entry, checksums, download,
the max_images subset and fitting to the configured size."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from ..errors import DataError
from ..images import fit_images


@dataclass
class SourceData:
    """What a source yields, already fitted to the configured size and channels."""
    images: np.ndarray                 # uint8 (N, C, H, W)
    labels: np.ndarray | None          # int64 (N,) or None
    class_names: list[str] | None
    details: dict = field(default_factory=dict)   # what was read (files, splits), for the manifest
    official_holdout: np.ndarray | None = None   # bool (N,): in the source's own test split; None: it has none
    skipped: list[dict] = field(default_factory=list)   # files left out, [{"file", "reason"}], for the manifest
    # a folder's: its files' index (sources/folder.py FILE_INDEX_KEYS), stored beside the images for the
    # next version's incremental preparation; and (rows here, rows of the previous version) it reused
    file_index: dict | None = None
    reused_rows: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Source:
    """One kind of source in SOURCES: the form of its string, whether it takes a path, how it is
    read and how its content is identified without reading it all (the preparation cache key).

    read(location, config, mirrors, checksums) -> SourceData, fitted to the config
    identity(location, checksums) -> a JSON-able dict that changes when the content does
    default_split: DataConfig.split when the config gives none
    """

    usage: str                                       # e.g. "mnist[:DIR]", for messages and help
    path: Literal["none", "optional", "required"]
    read: Callable[..., SourceData]
    identity: Callable[..., dict]
    downloads: bool = False                          # without a path: <download_dir>/<kind>, fetched there
    # DataConfig.split when none is given: "content" for a source that grows (a folder: a train image
    # stays in train as images are added), "random" for a fixed set
    default_split: Literal["random", "content", "official"] = "random"
    # read(..., previous=, workers=): reuses the lineage's previous version (a growing folder)
    incremental: bool = False


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
    """The md5 a file must have: injected (the caller's own), else published, else the folder's
    MD5SUMS, else None. A folder's MD5SUMS never overrides a published sum: it lives beside the
    files it would vouch for, so whoever changed a file could change it too."""
    for table in (checksums or {}, published, read_md5sums(folder)):
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


def select_and_fit(images, labels, config, official_holdout=None):
    """(images, labels, official_holdout) of the max_images subset, images fitted to the config."""
    keep = subset_indices(len(images), config.max_images, config.split_seed)
    if keep is not None:
        images = images[keep]
        labels = labels[keep] if labels is not None else None
        official_holdout = official_holdout[keep] if official_holdout is not None else None
    return fit_images(images, config.image_size, config.channels, config.resize), labels, official_holdout


def stat_entry(path: Path, root: Path) -> list:
    """[name relative to root, size, mtime]: a file's identity when no checksum is expected."""
    st = path.stat()
    return [str(path.relative_to(root)), st.st_size, st.st_mtime_ns]

"""Preparation: a source read once into one compact file plus a manifest, split and fingerprinted.

Layout of a prepared dataset (out_dir/<kind>-<S>x<S>x<C>-<hash12>/):
  data.npz       uncompressed arrays: images uint8 (N, C, S, S), labels int64 (N,) when known,
                 train_indices and holdout_indices int64 (sorted, disjoint, covering 0..N-1),
                 content_hashes uint8 (N, 16): the first 16 bytes of sha256 of each fitted image's
                 bytes (absent from folders prepared before it existed; not in the fingerprint)
  manifest.json  source, source identity, image size, channels, counts, split sizes, class names,
                 the files the source skipped and why (`skipped_files`: a folder's unreadable images),
                 the config, and the sha256 fingerprint of the content
The folder is written under a temporary name in out_dir and renamed at the end, so a failure
leaves nothing behind and a reader never sees a half-written dataset. Each folder a
preparation returns is recorded as a version of its lineage (ddpm.data.versions).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .errors import DataError
from .sources import SOURCES, SourceData, parse_source, read_source, source_identity, usage

MANIFEST = "manifest.json"
DATA_FILE = "data.npz"
FORMAT_VERSION = 1
CONTENT_HASH_BYTES = 16   # per-image content hash stored in data.npz: sha256 truncated


def default_split(source: str) -> str:
    """DataConfig.split when none is given: the kind of source's (Source.default_split)."""
    return SOURCES[parse_source(source)[0]].default_split


class DataConfig(BaseModel):
    """How to prepare a dataset. Invalid values raise pydantic.ValidationError naming the field.

    channels: 1 = gray, 3 = RGB (gray -> RGB repeats the plane, RGB -> gray is ITU-R 601-2 luma).
    resize: "center_crop" (default) cuts the largest centred square then resizes bilinearly;
            "resize" stretches to a square; "pad" centres each image on a black square without
            resampling (MNIST 28 -> 32); "none" requires images already image_size square.
    split: "random" holds out a seeded random holdout_fraction of the images (a permutation of
           all of them: when the source grows, old train images can move into the holdout);
           "content" holds out each image whose seeded content hash falls below holdout_fraction
           (a pure function of the image: identical images land together, a train image stays in
           train when the dataset grows, the holdout only gains new images); "official" keeps the
           source's own train/test split (MNIST: 60,000 train / 10,000 t10k; CIFAR-10: the five
           data batches / test_batch), so FID is measured against the standard test set.
           Not given (None): the source's default, resolved on validation: "content" for a folder
           (folders grow), "random" for digits, mnist and cifar10 (fixed sets), so DataConfig()
           is split="random" as it always was.
    max_images: a seeded random subset (by split_seed) of at most this many images.
    """
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field("digits", description=f"the data source: {usage()}")
    image_size: int = Field(16, description="side of the square images")
    channels: int = Field(1, description="1 gray or 3 RGB")
    holdout_fraction: float = Field(0.2, description="share held out for FID (split='random' or 'content')")
    split_seed: int = Field(0, description="seed of the random or content split and of the max_images subset")
    resize: Literal["resize", "center_crop", "pad", "none"] = Field(
        "center_crop", description="how images are fitted to the size (pad: black border, no resampling)")
    split: Literal["random", "official", "content"] | None = Field(
        None, validate_default=True,
        description="random: a seeded random holdout; content: a holdout by content hash that is stable as the "
                    "data grows; official: the source's train/test files; default: the source's (content for "
                    "a folder, random for the others)")
    max_images: int | None = Field(None, description="a seeded random subset of at most this many images")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        parse_source(value)   # DataError (a ValueError) -> ValidationError naming `source`
        return value

    @field_validator("split")
    @classmethod
    def _source_default_split(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and "source" in info.data:   # no source: its own error is reported
            return default_split(info.data["source"])
        return value

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: int) -> int:
        if not 4 <= value <= 1024:
            raise ValueError(f"image_size must be between 4 and 1024, got {value}")
        return value

    @field_validator("channels")
    @classmethod
    def _gray_or_rgb(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {value}")
        return value

    @field_validator("holdout_fraction")
    @classmethod
    def _open_unit_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1) exclusive, got {value}")
        return value

    @field_validator("max_images")
    @classmethod
    def _at_least_two(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError(f"max_images must be at least 2 (one train, one holdout), got {value}")
        return value


@dataclass
class PreparedDataset:
    """A prepared dataset in memory: all images plus the train/holdout split."""
    images: torch.Tensor              # uint8 (N, C, H, W)
    labels: torch.Tensor | None       # int64 (N,) or None
    train_indices: torch.Tensor       # int64
    holdout_indices: torch.Tensor     # int64
    manifest: dict
    path: Path
    content_hashes: torch.Tensor | None = None   # uint8 (N, 16); None: prepared before they were stored

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def split(self, name: Literal["train", "holdout"]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uint8 images, labels or None) of one split."""
        if name not in ("train", "holdout"):
            raise DataError(f"split must be 'train' or 'holdout', got {name!r}")
        index = self.train_indices if name == "train" else self.holdout_indices
        return self.images[index], (self.labels[index] if self.labels is not None else None)


# ---------------------------------------------------------------------------- split and fingerprint

def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n) -> (train, holdout), each sorted, disjoint, complete.

    A random permutation, never a cut in file order: MNIST's test file, for one, holds two
    writer populations one after the other.
    """
    if n < 2:
        raise DataError(f"need at least 2 images to split into train and holdout, got {n}")
    n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_holdout:]).astype(np.int64), np.sort(perm[:n_holdout]).astype(np.int64)


def content_hashes(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 16): the first 16 bytes of sha256 of each image's bytes (C, H, W in C order)."""
    images = np.ascontiguousarray(images)
    out = np.empty((len(images), CONTENT_HASH_BYTES), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = np.frombuffer(hashlib.sha256(memoryview(images[i]).cast("B")).digest(),
                               np.uint8, CONTENT_HASH_BYTES)
    return out


def content_buckets(images: np.ndarray, seed: int) -> np.ndarray:
    """float64 (N,) in [0, 1): the first 8 bytes (little-endian) of sha256(seed as 8 little-endian
    bytes + the image's bytes) / 2**64. A negative seed is taken modulo 2**64 (two's complement)."""
    images = np.ascontiguousarray(images)
    prefix = hashlib.sha256((int(seed) % 2**64).to_bytes(8, "little"))
    buckets = np.empty(len(images), dtype=np.float64)
    for i in range(len(images)):
        digest = prefix.copy()
        digest.update(memoryview(images[i]).cast("B"))
        buckets[i] = int.from_bytes(digest.digest()[:8], "little") / 2**64
    return buckets


def content_split_indices(images: np.ndarray, holdout_fraction: float, seed: int,
                          source: str = "the source") -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) by content: an image is held out iff its content bucket (content_buckets)
    is below holdout_fraction. Depends on nothing but the image, so a train image stays in train
    however the dataset grows. DataError when either side would be empty."""
    n = len(images)
    if n < 2:
        raise DataError(f"need at least 2 images to split into train and holdout, got {n}")
    holdout = content_buckets(images, seed) < holdout_fraction
    if holdout.all() or not holdout.any():
        side = "holdout" if holdout.all() else "train"
        raise DataError(f"split='content' put all {n} images of {source!r} in the {side} split (holdout_fraction="
                        f"{holdout_fraction}, split_seed={seed}): add images, change holdout_fraction or split_seed, "
                        "or use split='random'")
    return np.flatnonzero(~holdout).astype(np.int64), np.flatnonzero(holdout).astype(np.int64)


def official_split_indices(data: SourceData, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices of the source's own split: its test files are the holdout."""
    mask = data.official_holdout
    if mask is None:
        raise DataError(f"source {source!r} has no official train/test split; use split='random'")
    if mask.all() or not mask.any():
        present = ", ".join(data.details.get("splits", {})) or "one part"
        raise DataError(f"split='official' needs both the train and the test files of {source!r}, found only "
                        f"{present}; add the missing files or use split='random'")
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def fingerprint(images: np.ndarray, labels: np.ndarray | None, train: np.ndarray,
                holdout: np.ndarray) -> str:
    """sha256 over images, labels and both index arrays, each preceded by its dtype and shape.

    Any changed pixel, label or split membership changes it. Hashes the arrays' memory in
    place (no copy for contiguous arrays).
    """
    digest = hashlib.sha256()
    for name, array in (("images", images), ("labels", labels), ("train", train), ("holdout", holdout)):
        if array is None:
            digest.update(f"{name}:none;".encode())
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def dataset_name(config: DataConfig, identity: dict) -> str:
    """<kind>-<S>x<S>x<C>-<hash12>: different configs and sources coexist in one out_dir."""
    key = json.dumps({"config": config.model_dump(mode="json"), "identity": identity}, sort_keys=True)
    kind = config.source.partition(":")[0]
    size = config.image_size
    return f"{kind}-{size}x{size}x{config.channels}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- prepare

def default_download_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "downloads"


def prepared_path(config: DataConfig, out_dir: Path, download_dir: Path | None = None,
                  checksums: dict | None = None) -> Path:
    """Where prepare_dataset writes this config's dataset (cheap: no image is read)."""
    download_dir = Path(download_dir) if download_dir else default_download_dir(out_dir)
    return Path(out_dir) / dataset_name(config, source_identity(config.source, download_dir, checksums))


def prepare_dataset(config: DataConfig, out_dir: Path, *, download_dir: Path | None = None,
                    mirrors: list[str] | None = None, checksums: dict | None = None) -> Path:
    """Read, fit, split and fingerprint the source; write out_dir/<name>/ atomically; return it.

    download_dir: where `mnist`/`cifar10` without a path look for (and download) files,
    default out_dir/downloads. mirrors: base URLs to download from instead of the standard
    ones. checksums: {file name: md5} overriding MD5SUMS files and the published sums.
    The folder's name hashes the config and the source's identity, so an existing folder of that
    name that loads and matches its fingerprint is this dataset already: it is returned as it is
    (`ddpm prepare` then `ddpm train` prepares once). A damaged one is replaced.
    The folder returned is recorded as a version of the config's lineage in out_dir
    (ddpm.data.versions: out_dir/versions/), unless that history lists it already.
    """
    from .versions import record_version

    out_dir = Path(out_dir)
    download_dir = Path(download_dir) if download_dir else default_download_dir(out_dir)
    identity = source_identity(config.source, download_dir, checksums)
    final = out_dir / dataset_name(config, identity)
    if final.is_dir():
        try:
            found = load_prepared(final)
        except DataError:
            found = None   # incomplete or damaged: prepared again below
        if found is not None:
            record_version(found)
            return final

    data = read_source(config, download_dir, mirrors, checksums)
    if config.split == "official":
        train, holdout = official_split_indices(data, config.source)
    elif config.split == "content":
        train, holdout = content_split_indices(data.images, config.holdout_fraction, config.split_seed,
                                               config.source)
    else:
        train, holdout = split_indices(len(data.images), config.holdout_fraction, config.split_seed)
    hashes = content_hashes(data.images)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": config.source,
        "source_identity": identity,
        "source_details": data.details,
        "image_size": config.image_size,
        "channels": config.channels,
        "count": int(len(data.images)),
        "splits": {"train": int(len(train)), "holdout": int(len(holdout))},
        "has_labels": data.labels is not None,
        "class_names": data.class_names,   # labels are positions in it: retraining compares names (flows.retrain)
        "skipped_files": data.skipped,
        "config": config.model_dump(mode="json"),
        "fingerprint": fingerprint(data.images, data.labels, train, holdout),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir))
    tmp.chmod(0o777 & ~_umask())   # mkdtemp makes it 0700; a prepared folder is as readable as any other
    try:
        arrays = {"images": data.images, "train_indices": train, "holdout_indices": holdout,
                  "content_hashes": hashes}
        if data.labels is not None:
            arrays["labels"] = data.labels
        save_npz(tmp / DATA_FILE, arrays)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del data, arrays   # the images are not needed to record the version (it may read the previous one's)
    record_version(final, hashes=hashes, train=train, holdout=holdout, manifest=manifest)
    return final


def save_npz(path: Path, arrays: dict[str, np.ndarray], chunk: int = 1 << 20) -> None:
    """An uncompressed .npz (what np.load reads), written 1 MiB at a time.

    np.savez serialises each array in 16 MiB pieces via tobytes(); streaming a memoryview
    keeps preparation to a single copy of the images in memory.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, np.lib.format.header_data_from_array_1_0(array))
                data = memoryview(array).cast("B")
                for start in range(0, len(data), chunk):
                    f.write(data[start:start + chunk])


def _replace_dir(new: Path, final: Path) -> None:
    """Rename `new` to `final`, replacing an existing `final` (moved aside, then removed)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


# ---------------------------------------------------------------------------- load and check

def read_manifest(path: Path) -> dict:
    """The manifest of a prepared folder; DataError when it is missing or unreadable."""
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is not a prepared dataset: {MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {file}: {exc}") from exc


def load_prepared(path: Path, verify: bool = True) -> PreparedDataset:
    """Load a prepared folder; with verify, recompute the fingerprint and compare to the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        with np.load(path / DATA_FILE, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:
        raise DataError(f"cannot read {path / DATA_FILE}: {exc}") from exc
    images = arrays.get("images")
    expected = (manifest["count"], manifest["channels"], manifest["image_size"], manifest["image_size"])
    if images is None or images.shape != expected or images.dtype != np.uint8:
        got = None if images is None else (images.shape, str(images.dtype))
        raise DataError(f"{path / DATA_FILE} no longer matches its manifest: images {got}, "
                        f"manifest says uint8 {expected}")
    labels = arrays.get("labels")
    train, holdout = arrays.get("train_indices"), arrays.get("holdout_indices")
    if train is None or holdout is None:
        raise DataError(f"{path / DATA_FILE} no longer matches its manifest: split indices missing")
    hashes = arrays.get("content_hashes")   # absent from folders prepared before it was stored
    if hashes is not None and (hashes.shape != (len(images), CONTENT_HASH_BYTES) or hashes.dtype != np.uint8):
        raise DataError(f"{path / DATA_FILE} no longer matches its manifest: content_hashes {hashes.shape} "
                        f"{hashes.dtype}, expected uint8 {(len(images), CONTENT_HASH_BYTES)}")
    if verify:
        actual = fingerprint(images, labels, train, holdout)
        if actual != manifest["fingerprint"]:
            raise DataError(f"content of {path} no longer matches its manifest: fingerprint "
                            f"{actual[:16]}..., manifest says {manifest['fingerprint'][:16]}...")
        if hashes is not None and not np.array_equal(hashes, content_hashes(images)):
            raise DataError(f"content hashes of {path} no longer match its images")
    return PreparedDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels) if labels is not None else None,
        train_indices=torch.from_numpy(train),
        holdout_indices=torch.from_numpy(holdout),
        manifest=manifest,
        path=path,
        content_hashes=torch.from_numpy(hashes) if hashes is not None else None,
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def validate_for_model(data: PreparedDataset | dict, image_size: int, channels: int,
                       num_classes: int | None = None) -> None:
    """DataError when prepared data (dataset or manifest) does not fit the model: another size or
    channel count, or, for a class-conditional model (`num_classes`), no labels or more classes."""
    manifest = data.manifest if isinstance(data, PreparedDataset) else data
    got = (manifest["image_size"], manifest["channels"])
    if got != (image_size, channels):
        raise DataError(
            f"prepared data is {got[0]}x{got[0]} with {got[1]} channel(s) but the model expects "
            f"{image_size}x{image_size} with {channels}: prepare with image_size={image_size}, "
            f"channels={channels}")
    if num_classes is None:
        return
    if not manifest["has_labels"]:
        raise DataError(f"a class-conditional model (num_classes={num_classes}) needs labelled data, and "
                        f"{manifest['source']!r} has no labels (a folder source has them when its images sit in "
                        "one sub-folder per class); train an unconditional model (num_classes None) instead")
    count = len(manifest.get("class_names") or [])
    if count > num_classes:
        raise DataError(f"the data has {count} classes but the model was given num_classes={num_classes}; "
                        f"set num_classes={count} (ddpm train --conditional takes it from the data)")

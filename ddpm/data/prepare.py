"""Preparation: a source read once into one compact file plus a manifest, split and fingerprinted.

Layout of a prepared dataset (out_dir/<kind>-<S>x<S>x<C>-<hash12>/):
  data.npz       uncompressed arrays: images uint8 (N, C, S, S), labels int64 (N,) when known,
                 train_indices and holdout_indices int64 (sorted, disjoint, covering 0..N-1),
                 content_hashes uint8 (N, 16): the first 16 bytes of sha256 of each fitted image's
                 bytes (absent from folders prepared before it existed; not in the fingerprint)
  manifest.json  source, source identity, image size, channels, counts, split sizes, class names,
                 the files the source skipped and why (`skipped_files`: a folder's unreadable images),
                 the config, and the sha256 fingerprint of the content
  files.npz      a folder source's file index (names, sizes, mtimes, sha256 of the bytes, rows): what
                 the next version's incremental preparation reuses (sources/folder.py)
  .verified.json written by load_prepared once it has checked the fingerprint of this data.npz (its
                 inode, size, mtime and ctime): a later load of the same file skips the hashing
The folder is written under a temporary name in out_dir and renamed at the end, so a failure
leaves nothing behind and a reader never sees a half-written dataset. Each folder a
preparation returns is recorded as a version of its lineage (ddpm.data.versions).

Loading maps the images (data.npz is an uncompressed zip: the array is read in place, copy on
write) instead of reading them: every load in one process shares one mapping, and the kernel's
page cache holds the bytes once for every process on the host. A dataset larger than memory then
trains from disk (pages come and go), at the disk's random-read speed.

A folder grows night after night: its new version decodes only the files that are new or changed
(sources/folder.py), and a version whose content (fingerprint, skipped files) equals one of its
lineage's existing folders is that folder (a re-stamped copy of the folder, a `touch`): no new copy
is written, the identity is recorded as an alias of it (ddpm.data.versions).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import threading
import weakref
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
FILES_FILE = "files.npz"          # a folder source's file index (incremental preparation)
VERIFIED_FILE = ".verified.json"  # the data.npz whose fingerprint load_prepared checked
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
        """(uint8 images, labels or None) of one split: a copy of its rows (a training reads the
        train split in place: BatchLoader(dataset.images, index=dataset.train_indices))."""
        index = self.split_indices(name)
        return self.images[index], (self.labels[index] if self.labels is not None else None)

    def split_indices(self, name: Literal["train", "holdout"]) -> torch.Tensor:
        """The rows of `images` in one split (int64, sorted)."""
        if name not in ("train", "holdout"):
            raise DataError(f"split must be 'train' or 'holdout', got {name!r}")
        return self.train_indices if name == "train" else self.holdout_indices


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
                  checksums: dict | None = None, identity: dict | None = None) -> Path:
    """Where prepare_dataset writes (or found) this config's dataset (cheap: no image is read):
    out_dir/<name>, or the folder of the lineage that this source state was found to equal (an
    alias: a re-stamped folder). `identity`: the source's, when the caller has it (one listing)."""
    from .versions import alias_of

    download_dir = Path(download_dir) if download_dir else default_download_dir(out_dir)
    if identity is None:
        identity = source_identity(config.source, download_dir, checksums)
    name = dataset_name(config, identity)
    final = Path(out_dir) / name
    if not final.is_dir() and (alias := alias_of(config, out_dir, name)) is not None:
        return Path(out_dir) / alias
    return final


def _load_if_intact(path: Path) -> PreparedDataset | None:
    try:
        return load_prepared(path) if path.is_dir() else None
    except DataError:
        return None   # incomplete or damaged: prepared again


def prepare_dataset(config: DataConfig, out_dir: Path, *, download_dir: Path | None = None,
                    mirrors: list[str] | None = None, checksums: dict | None = None,
                    workers: int | None = None) -> Path:
    """Read, fit, split and fingerprint the source; write out_dir/<name>/ atomically; return it.

    download_dir: where `mnist`/`cifar10` without a path look for (and download) files,
    default out_dir/downloads. mirrors: base URLs to download from instead of the standard
    ones. checksums: {file name: md5} overriding MD5SUMS files and the published sums.
    workers: processes decoding a folder's images (default DDPM_PREPARE_WORKERS, else the cores).
    The folder's name hashes the config and the source's identity, so an existing folder of that
    name that loads and matches its fingerprint is this dataset already: it is returned as it is
    (`ddpm prepare` then `ddpm train` prepares once). A damaged one is replaced.
    A folder source is read incrementally from its lineage's newest version (see the module doc);
    a result equal to an existing version of the lineage returns that version's folder.
    The folder returned is recorded as a version of the config's lineage in out_dir
    (ddpm.data.versions: out_dir/versions/), unless that history lists it already.
    """
    from .versions import incremental_base, record_alias, record_version, same_version

    out_dir = Path(out_dir)
    download_dir = Path(download_dir) if download_dir else default_download_dir(out_dir)
    identity = source_identity(config.source, download_dir, checksums)
    name = dataset_name(config, identity)
    final = out_dir / name
    for candidate in dict.fromkeys((final, prepared_path(config, out_dir, download_dir, checksums, identity))):
        if (found := _load_if_intact(candidate)) is not None:
            record_version(found)
            return candidate

    previous = incremental_base(config, out_dir) if SOURCES[parse_source(config.source)[0]].incremental else None
    data = read_source(config, download_dir, mirrors, checksums, previous=previous, workers=workers)
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
    del previous   # its mapping is not needed any more
    if (same := same_version(config, out_dir, manifest)) is not None:
        # the content of a version the lineage has (a re-stamped folder): that folder, no new copy
        record_alias(config, out_dir, name, same.name)
        record_version(same)
        return same
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir))
    tmp.chmod(0o777 & ~_umask())   # mkdtemp makes it 0700; a prepared folder is as readable as any other
    try:
        arrays = {"images": data.images, "train_indices": train, "holdout_indices": holdout,
                  "content_hashes": hashes}
        if data.labels is not None:
            arrays["labels"] = data.labels
        save_npz(tmp / DATA_FILE, arrays)
        if data.file_index is not None:
            save_npz(tmp / FILES_FILE, data.file_index)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _mark_verified(final, manifest["fingerprint"])   # its fingerprint was computed from these very arrays
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


_PROCESS_LOCK = threading.Lock()
_MAPPED: "weakref.WeakValueDictionary[tuple, np.ndarray]" = weakref.WeakValueDictionary()   # file key -> images
_VERIFIED: set[tuple] = set()   # (file key, fingerprint) checked in this process


def _file_key(file: Path) -> tuple:
    """What identifies one version of a file: its real path, device, inode, size, mtime and ctime
    (a rewrite changes the ctime, which no tool sets back)."""
    st = os.stat(file)
    return (os.path.realpath(file), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp_key(key: tuple) -> list:
    return list(key[2:])   # not the path: a folder moved or renamed keeps its check


def _verified(path: Path, key: tuple, fingerprint_: str) -> bool:
    if (key, fingerprint_) in _VERIFIED:
        return True
    try:
        stamp = json.loads((path / VERIFIED_FILE).read_text())
        return stamp["data"] == _stamp_key(key) and stamp["fingerprint"] == fingerprint_
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mark_verified(path: Path, fingerprint_: str, key: tuple | None = None) -> None:
    """Remember that this data.npz holds `fingerprint_`: in this process, and in the folder's
    .verified.json when it can be written (a read-only folder is checked once per process)."""
    try:
        key = key or _file_key(path / DATA_FILE)
    except OSError:
        return
    _VERIFIED.add((key, fingerprint_))
    body = json.dumps({"data": _stamp_key(key), "fingerprint": fingerprint_})
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{VERIFIED_FILE}.tmp-", dir=path)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path / VERIFIED_FILE)
    except OSError:
        pass


def _npy_member(handle, info: zipfile.ZipInfo) -> tuple[int, np.dtype, tuple, bool] | None:
    """(offset of the array's bytes in the file, dtype, shape, fortran order) of an .npy member
    stored uncompressed; None when it cannot be read in place."""
    import struct

    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:   # compressed or encrypted
        return None
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    handle.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        return None
    if dtype.hasobject:
        return None
    return handle.tell(), dtype, shape, fortran


def _read_arrays(file: Path, key: tuple) -> dict[str, np.ndarray]:
    """The arrays of a data.npz: the images mapped (copy on write; one mapping per file version in
    this process), the rest (indices, labels, hashes: small) read. np.load's reading when the zip
    cannot be mapped (a compressed member)."""
    with _PROCESS_LOCK:
        images = _MAPPED.get(key)
    arrays: dict[str, np.ndarray] = {}
    with open(file, "rb") as handle, zipfile.ZipFile(handle) as zf:
        members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
        layout = _npy_member(handle, members["images"]) if "images" in members and images is None else None
        if layout is not None:
            offset, dtype, shape, fortran = layout
            count = int(np.prod(shape))
            if offset + count * dtype.itemsize > key[3]:
                raise DataError(f"{file} is truncated: its images need {offset + count * dtype.itemsize} bytes, "
                                f"the file has {key[3]}")
            if count and not fortran:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                images = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
                with _PROCESS_LOCK:
                    images = _MAPPED.setdefault(key, images)
        for name in members:
            if name == "images" and images is not None:
                arrays[name] = images
                continue
            with zf.open(members[name]) as member:
                arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def memory_available() -> int:
    """Bytes this process can still fill: the system's MemAvailable, or less where its own memory
    cgroup (v2 memory.max, v1 memory.limit_in_bytes, its page cache counted as free) leaves less.
    Limits set on a parent cgroup, or a cgroup not visible at the path /proc/self/cgroup names
    (some containers), are not seen: MemAvailable then decides."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":   # cgroup v2: one hierarchy
                folder = Path("/sys/fs/cgroup") / group.lstrip("/")
            elif "memory" in controllers.split(","):   # cgroup v1: the memory controller's
                folder = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            else:
                continue
            for limit_file, usage_file in (("memory.max", "memory.current"),
                                           ("memory.limit_in_bytes", "memory.usage_in_bytes")):
                try:
                    limit = (folder / limit_file).read_text().strip()
                    usage = int((folder / usage_file).read_text())
                except (OSError, ValueError):
                    continue
                if limit.isdigit() and int(limit) < 2**60:
                    # the group's page cache counts in its usage, but is given back when needed
                    room = int(limit) - max(0, usage - _cgroup_page_cache(folder))
                    available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available if available is not None else 2**62


def _cgroup_page_cache(folder: Path) -> int:
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ("file", "cache"):   # v2, v1
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _advise(images: np.ndarray, advice_name: str) -> None:
    """madvise the mapping under `images` (found through its .base chain), where there is one."""
    advice = getattr(mmap, advice_name, None)
    base = images
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if advice is not None and base is not None:
        try:
            base.madvise(advice)
        except (OSError, ValueError):
            pass


def load_prepared(path: Path, verify: bool = True) -> PreparedDataset:
    """Load a prepared folder, its images memory-mapped (see the module doc). With verify, the
    fingerprint and content hashes are recomputed and compared to the manifest once per version of
    data.npz (its inode, size, mtime and ctime: .verified.json, and in this process), so a run that
    loads its data three times hashes it once, and a rewritten file is checked again."""
    path = Path(path)
    manifest = read_manifest(path)
    file = path / DATA_FILE
    try:
        key = _file_key(file)
        arrays = _read_arrays(file, key)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {file}: {exc}") from exc
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
    # Images larger than half the memory left are read from disk as training asks for them: the
    # kernel's readahead (up to 128 KiB per fault) would read ~10x what a random batch needs and
    # evict what the next batch needs (an epoch 100x slower), so the mapping says random access,
    # after a sequential verification. Smaller ones keep readahead: a cold first epoch reads fast.
    beyond_memory = images.nbytes > memory_available() // 2
    if verify and not _verified(path, key, manifest["fingerprint"]):
        if beyond_memory:
            _advise(images, "MADV_SEQUENTIAL")
        actual = fingerprint(images, labels, train, holdout)
        if actual != manifest["fingerprint"]:
            raise DataError(f"content of {path} no longer matches its manifest: fingerprint "
                            f"{actual[:16]}..., manifest says {manifest['fingerprint'][:16]}...")
        if hashes is not None and not np.array_equal(hashes, content_hashes(images)):
            raise DataError(f"content hashes of {path} no longer match its images")
        _mark_verified(path, manifest["fingerprint"], key)
    _advise(images, "MADV_RANDOM" if beyond_memory else "MADV_NORMAL")   # the mapping is shared: say it each load
    return PreparedDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels) if labels is not None else None,
        train_indices=torch.from_numpy(train),
        holdout_indices=torch.from_numpy(holdout),
        manifest=manifest,
        path=path,
        content_hashes=torch.from_numpy(hashes) if hashes is not None else None,
    )


def read_file_index(path: Path) -> dict | None:
    """The file index a folder source stored with a prepared folder (files.npz), None when it has none."""
    try:
        with np.load(Path(path) / FILES_FILE, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        return None
    except Exception as exc:   # damaged: the next version is prepared from nothing
        raise DataError(f"cannot read {Path(path) / FILES_FILE}: {exc}") from exc


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

"""An image folder: PNG/JPEG files (recursively); class sub-folders give labels.

Classes are the names of the immediate sub-folders, sorted; a label is a class's position in that
list, so the names are stored with the prepared data (its manifest's `class_names`) and retraining
compares them by name (flows.retrain), never by position. Symbolic links to folders are followed
(a link back to a folder that contains it is refused: it would loop). An image file that cannot be
used (unreadable, truncated, a dangling link, too small) is skipped: the prepared manifest lists
it with the reason (`skipped_files`) and one warning says so; a folder none of whose images can
be used is a DataError.

The folder's identity (what decides whether it is prepared again) is its image files' names,
sizes and modification times, which costs a stat a file: an image replaced by another of the same
size and mtime (a copy that keeps times, `cp -p`, `rsync -t` of an edited file) is not seen as a
change. `DDPM_VERIFY_CONTENT=1` identifies each file by the sha256 of its bytes instead (every
image is read on every preparation, cached or not: seconds for 10,000 small files).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import fit_images
from .base import Source, SourceData, file_digest, subset_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VERIFY_CONTENT_ENV = "DDPM_VERIFY_CONTENT"   # "1": a folder's identity hashes its files' bytes, not stat


class BadImageFile(DataError):
    """An image file that cannot be trained on (unreadable, truncated, values out of range, too
    small): a folder skips it and records `reason` rather than failing as a whole."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"image {path} {reason}")
        self.path, self.reason = path, reason


def _walk_files(folder: Path) -> list[Path]:
    """Every file under `folder`, symbolic links to folders followed (Path.rglob does not follow
    them: a linked class folder would silently be missing); a dangling link is listed too (it is
    then skipped as unreadable, not forgotten). DataError for a link to a folder that contains it."""
    files: list[Path] = []
    stack = [(folder, frozenset({os.path.realpath(folder)}))]   # (folder, the real paths above and at it)
    while stack:
        directory, ancestors = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise DataError(f"cannot list folder {directory}: {exc.strerror or exc}") from exc
        for entry in entries:
            path = directory / entry.name
            if entry.is_dir():   # follows links
                real = os.path.realpath(path)
                if real in ancestors:
                    raise DataError(f"{path} is a symbolic link to {real}, a folder that contains it: following it "
                                    "would loop; remove the link")
                stack.append((path, ancestors | {real}))
            elif entry.is_file() or entry.is_symlink():
                files.append(path)
    return sorted(files)


def list_folder_images(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Image files under `folder` (sorted) and class names when laid out as class sub-folders."""
    if not folder.exists():
        raise DataError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    all_files = _walk_files(folder)
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
    """One image file -> (C, H, W) uint8; BadImageFile naming the file when it cannot be used.

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
                    raise BadImageFile(path, f"holds {img.mode} values outside 0..65535")
                img = Image.fromarray(np.rint(wide / 257).astype(np.uint8), mode="L")
            img = img.convert("L" if channels == 1 else "RGB")   # alpha is dropped
            array = np.array(img)   # a writable copy
    except DataError:
        raise
    except Exception as exc:
        raise BadImageFile(path, f"cannot be read: {exc}") from exc
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise BadImageFile(path, f"is {array.shape[0]}x{array.shape[1]}: smaller than {MIN_IMAGE_SIDE} px on a side, "
                                 "too small to train on")
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_folder(folder: Path, config, mirrors=None, checksums=None) -> SourceData:
    """Decode, convert and fit every usable image of a folder into one (N, C, S, S) uint8 array;
    the files it skips (BadImageFile) are the result's `skipped`, with their reasons."""
    files, class_names = list_folder_images(folder)
    keep = subset_indices(len(files), config.max_images, config.split_seed)
    if keep is not None:
        files = [files[i] for i in keep]
    size = config.image_size
    skipped: dict[Path, str] = {}
    sizes: dict[tuple, str] = {}   # resize='none': each size decoded, so that a mix is named in full
    mismatch = None
    images = np.empty((len(files), config.channels, size, size), dtype=np.uint8)
    used = []
    for path in files:
        try:
            decoded = _decode(path, config.channels)
        except BadImageFile as bad:
            skipped[path] = bad.reason
            continue
        if config.resize == "none":
            sizes.setdefault(decoded.shape[1:], path.name)
            if decoded.shape[1:] != (size, size):
                mismatch = decoded   # refused below, once every size is known
                continue
        images[len(used)] = fit_images(decoded[None], size, config.channels, config.resize)[0]
        used.append(path)
    if len(sizes) > 1:
        mix = ", ".join(f"{h}x{w} (e.g. {name})" for (h, w), name in sorted(sizes.items()))
        raise DataError(f"images in {folder} have mixed sizes {mix} and resize='none': "
                        "choose resize='resize' or 'center_crop'")
    if mismatch is not None:
        fit_images(mismatch[None], size, config.channels, config.resize)   # raises: one size, not image_size
    skipped_files = [{"file": str(p.relative_to(folder)), "reason": skipped[p]} for p in files if p in skipped]
    if not used:
        first = skipped_files[0]
        raise DataError(f"none of the {len(files)} image files in {folder} can be used, e.g. {first['file']} "
                        f"{first['reason']}")
    if skipped_files:
        first = skipped_files[0]
        more = f" and {len(skipped_files) - 1} more" if len(skipped_files) > 1 else ""
        warnings.warn(f"skipped {len(skipped_files)} of {len(files)} image files in {folder}: {first['file']} "
                      f"{first['reason']}{more} (the prepared manifest's skipped_files lists them)", stacklevel=2)
    if len(used) < len(files):
        images = images[:len(used)].copy()   # not a view holding the skipped rows' memory
    labels = None
    if class_names is not None:   # by the listing's classes: a class whose files were all skipped keeps its index
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.relative_to(folder).parts[0]] for p in used], dtype=np.int64)
    return SourceData(images, labels, class_names, {"folder": str(folder), "files": len(used)},
                      skipped=skipped_files)


def _file_entry(path: Path, root: Path, content: bool) -> list:
    """[name relative to root, size, mtime] (with `content`: [name, sha256 of the bytes]); a file
    that cannot be read is [name, the error's name], so the identity stays deterministic."""
    name = str(path.relative_to(root))
    try:
        if content:
            return [name, file_digest(path, "sha256")]
        st = path.stat()
        return [name, st.st_size, st.st_mtime_ns]
    except OSError as exc:
        return [name, f"unreadable: {type(exc).__name__} {exc.errno}"]


def verify_content() -> bool:
    """Whether a folder is identified by its files' bytes (DDPM_VERIFY_CONTENT=1) rather than stat."""
    return os.environ.get(VERIFY_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes")


def folder_identity(folder: Path, checksums: dict | None = None) -> dict:
    """The folder and a hash of its image files' names, sizes and mtimes (DDPM_VERIFY_CONTENT=1:
    names and sha256 of their bytes)."""
    files, _ = list_folder_images(folder)
    content = verify_content()
    listing = hashlib.sha256(repr([_file_entry(f, folder, content) for f in files]).encode()).hexdigest()
    identity = {"kind": "folder", "path": str(folder.resolve()), "files": len(files), "listing_sha256": listing}
    if content:   # a key of its own: a stat listing and a content listing never coincide
        identity["listing"] = "content"
    return identity


# a folder grows (nightly retraining): split by content, so that its train images stay in train
SOURCE = Source("folder:DIR", "required", read_folder, folder_identity, default_split="content")

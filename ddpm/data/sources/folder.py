"""An image folder: PNG/JPEG files (recursively); class sub-folders give labels."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import fit_images
from .base import Source, SourceData, stat_entry, subset_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

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


def read_folder(folder: Path, config, mirrors=None, checksums=None) -> SourceData:
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



def folder_identity(folder: Path, checksums: dict | None = None) -> dict:
    """The folder and a hash of its image files' names, sizes and mtimes."""
    files, _ = list_folder_images(folder)
    listing = hashlib.sha256(repr([stat_entry(f, folder) for f in files]).encode()).hexdigest()
    return {"kind": "folder", "path": str(folder.resolve()), "files": len(files), "listing_sha256": listing}


# a folder grows (nightly retraining): split by content, so that its train images stay in train
SOURCE = Source("folder:DIR", "required", read_folder, folder_identity, default_split="content")

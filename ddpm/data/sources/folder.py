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

Incremental preparation: a prepared folder stores, beside its images, an index of the files it
was made from (`files`: each file's name, size, mtime, the sha256 of its bytes and its row, -1 for
a skipped one). Preparing a new version of the folder, read_folder takes the previous version's
index and images (`previous`) and decodes only what is new: a file whose name, size and mtime are
the index's keeps its row (with DDPM_VERIFY_CONTENT=1 no file is trusted by its stat); any other
file is read and hashed, and one whose bytes some indexed file had (a `touch`, a copy without
`-p`, a rename) keeps that row too; only the rest is decoded. Decoding runs in `workers` processes
when there are at least PARALLEL_MIN_FILES files to decode (DDPM_PREPARE_WORKERS overrides the
count: the usable cores). Fitting is one batched resize per run of images of one size. The result
equals a preparation from nothing byte for byte, except where the stat blind spot above hides a
replaced file (with DDPM_VERIFY_CONTENT=1, never).
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...machine import usable_cores
from ..errors import DataError
from ..images import fit_images
from .base import Source, SourceData, file_digest, subset_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VERIFY_CONTENT_ENV = "DDPM_VERIFY_CONTENT"   # "1": a folder's identity hashes its files' bytes, not stat
WORKERS_ENV = "DDPM_PREPARE_WORKERS"         # processes that decode a folder's images (default: the usable cores)
PARALLEL_MIN_FILES = 2000                    # fewer files to decode: one process (starting workers costs more)
CHUNK_FILES = 256                            # files a worker decodes per task, at most
CHUNK_BYTES = 4 << 20                        # file bytes a worker decodes per task, about (photos: a few files)
FIT_RUN_BYTES = 64 << 20                     # decoded images fitted at once (one shape): bounds the decodes held


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
    names = _relative(files, folder)   # Path order (by parts) without Path comparisons: 10x faster at 60,000
    return [files[i] for i in sorted(range(len(files)), key=lambda i: names[i].split(os.sep))]


def _relative(paths: list[Path], folder: Path) -> list[str]:
    """str(path.relative_to(folder)) of paths built as folder / ... (without pathlib's cost)."""
    prefix = str(folder)
    if prefix == ".":
        return [str(path) for path in paths]
    cut = len(prefix) + (0 if prefix.endswith(os.sep) else 1)
    return [text[cut:] if text.startswith(prefix) else str(path.relative_to(folder))
            for path, text in ((path, str(path)) for path in paths)]


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
    parts = [name.split(os.sep) for name in _relative(files, folder)]
    depths = {len(p) for p in parts}
    class_names = sorted({p[0] for p in parts}) if depths == {2} else None
    return files, class_names


MIN_IMAGE_SIDE = 4   # smaller "images" (icons, 1x1 pixels) are refused, not silently blown up


def _decode(path: Path, channels: int, data: bytes | None = None) -> np.ndarray:
    """One image file -> (C, H, W) uint8; BadImageFile naming the file when it cannot be used.
    `data`: the file's bytes when they were read already (they are decoded; errors name `path`).

    16-bit gray (PIL modes I;16*, I) is scaled to 8 bits (x / 257, rounded): PIL's own
    convert("L") clips it, turning every 16-bit image white.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        if data is None:
            data = Path(path).read_bytes()
        try:
            opened = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:   # the message PIL gives for a path, not for a BytesIO's repr
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
        with opened as img:
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


@dataclass
class PreviousVersion:
    """What incremental preparation reuses from the lineage's previous version: its file index
    (FILE_INDEX_KEYS arrays, as stored beside its images) and its fitted images (uint8, memory-mapped)."""
    index: dict
    images: np.ndarray


FILE_INDEX_KEYS = ("names", "sizes", "mtimes", "sha256", "rows")


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_one(path: Path, channels: int, known: frozenset | set) -> tuple:
    """("known", sha256) for bytes an indexed file had; ("image", sha256, (C, H, W) uint8);
    ("bad", sha256 or b"", reason)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ("bad", b"", f"cannot be read: {exc}")
    sha = hashlib.sha256(data).digest()
    if sha in known:
        return ("known", sha)
    try:
        return ("image", sha, _decode(path, channels, data))
    except BadImageFile as bad:
        return ("bad", sha, bad.reason)


_WORKER: dict = {}


def _init_worker(channels: int, known: frozenset) -> None:
    _WORKER.update(channels=channels, known=known)


def _read_chunk(paths: list[Path]) -> list[tuple]:
    return [_read_one(path, _WORKER["channels"], _WORKER["known"]) for path in paths]


def decode_workers(requested: int | None = None) -> int:
    """Processes that decode a folder: `requested`, else DDPM_PREPARE_WORKERS, else the usable cores."""
    if requested is None:
        text = os.environ.get(WORKERS_ENV, "").strip()
        if text:
            try:
                requested = int(text)
            except ValueError:
                raise DataError(f"{WORKERS_ENV}={text!r} is not a whole number of processes") from None
        else:
            requested = usable_cores()
    return max(1, int(requested))


def _read_files(paths: list[Path], sizes: list[int], channels: int, known: set, workers: int):
    """_read_one of each path, in order, as they come: in `workers` forked processes when there are
    enough (the caller fits each run of images as it arrives: never every decoded image at once).
    `sizes`: each file's bytes (its stat: 0 when it has none), to cut the chunks."""
    import multiprocessing

    if workers < 2 or len(paths) < PARALLEL_MIN_FILES or "fork" not in multiprocessing.get_all_start_methods():
        yield from (_read_one(path, channels, known) for path in paths)
        return
    chunks = _chunks(paths, sizes)
    # fork: the workers need nothing but PIL and numpy (no torch, no threads of the parent's)
    with multiprocessing.get_context("fork").Pool(min(workers, len(chunks)), _init_worker,
                                                  (channels, frozenset(known))) as pool:
        # at most two chunks per worker decoded ahead of the one being fitted (imap would decode
        # them all ahead: every decoded image in memory again when fitting is the slower side)
        window: collections.deque = collections.deque()
        pending = iter(chunks)
        for chunk in itertools.islice(pending, 2 * workers):
            window.append(pool.apply_async(_read_chunk, (chunk,)))
        while window:
            done = window.popleft().get()
            for chunk in itertools.islice(pending, 1):
                window.append(pool.apply_async(_read_chunk, (chunk,)))
            yield from done


def _chunks(paths: list[Path], sizes: list[int]) -> list[list[Path]]:
    """Runs of at most CHUNK_FILES files and CHUNK_BYTES of file bytes (a chunk of large photos is
    a few files: its decoded images travel back to the parent together)."""
    chunks, chunk, size = [], [], 0
    for path, file_size in zip(paths, sizes):
        if chunk and (len(chunk) >= CHUNK_FILES or size >= CHUNK_BYTES):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(path)
        size += file_size
    if chunk:
        chunks.append(chunk)
    return chunks


def _previous_lookup(previous: PreviousVersion | None) -> tuple[dict, dict]:
    """({name: (size, mtime, sha256, row)} of the previous version's usable files, {sha256: row})."""
    if previous is None:
        return {}, {}
    index = previous.index
    by_name, by_sha = {}, {}
    for name, size, mtime, sha, row in zip(index["names"].tolist(), index["sizes"].tolist(),
                                           index["mtimes"].tolist(), index["sha256"], index["rows"].tolist()):
        if row >= 0:
            digest = sha.tobytes()
            by_name[name] = (size, mtime, digest, row)
            by_sha.setdefault(digest, row)
    return by_name, by_sha


def read_folder(folder: Path, config, mirrors=None, checksums=None, previous: PreviousVersion | None = None,
                workers: int | None = None) -> SourceData:
    """Decode, convert and fit every usable image of a folder into one (N, C, S, S) uint8 array;
    the files it skips (BadImageFile) are the result's `skipped`, with their reasons. `previous`:
    the lineage's previous version, whose images are reused for the files it had (see the module
    doc); the result's `details["reused"]` counts them and `file_index` is the new index."""
    files, class_names = list_folder_images(folder)
    keep = subset_indices(len(files), config.max_images, config.split_seed)
    if keep is not None:
        files = [files[i] for i in keep]
    names = _relative(files, folder)
    size = config.image_size
    trust_stat = not verify_content()
    by_name, by_sha = _previous_lookup(previous)

    stats = [_stat(p) for p in files]
    shas: list[bytes] = [b""] * len(files)
    source_rows = np.full(len(files), -1, dtype=np.int64)   # a row of previous.images to reuse, else -1
    to_read = []
    for i, (name, stat) in enumerate(zip(names, stats)):
        known = by_name.get(name)
        if trust_stat and known is not None and stat is not None and stat == known[:2]:
            shas[i], source_rows[i] = known[2], known[3]
        else:
            to_read.append(i)
    results = _read_files([files[i] for i in to_read], [stats[i][0] if stats[i] else 0 for i in to_read],
                          config.channels, set(by_sha), decode_workers(workers))

    # One pass in file order: a file's row is the count of usable files before it, so each decoded
    # image is fitted into its row as it arrives, a run of one shape at a time (a folder of large
    # photos fitted to 64x64 holds the fitted array, one run of FIT_RUN_BYTES, and the chunks the
    # workers decoded ahead, never every decoded image). Rows past the usable count are never
    # written (never paged in).
    images = np.empty((len(files), config.channels, size, size), dtype=np.uint8)
    rows = np.full(len(files), -1, dtype=np.int64)
    skipped: dict[int, str] = {}
    sizes: dict[tuple, str] = {}   # resize='none': each size decoded, so that a mix is named in full
    mismatch = None
    run: list[tuple[int, np.ndarray]] = []
    reading = iter(zip(to_read, results))
    used = 0
    try:
        for i in range(len(files)):
            if source_rows[i] < 0:   # not known by its stat: read (to_read is in file order)
                _, result = next(reading)
                shas[i] = result[1]
                if result[0] == "known":
                    source_rows[i] = by_sha[result[1]]
                elif result[0] == "bad":
                    skipped[i] = result[2]
                    continue
                else:
                    array = result[2]
                    if config.resize == "none":
                        sizes.setdefault(array.shape[1:], files[i].name)
                        if array.shape[1:] != (size, size):
                            mismatch = array   # refused below, once every size is known
                            continue
                    if run and (run[0][1].shape != array.shape or len(run) * run[0][1].nbytes >= FIT_RUN_BYTES):
                        _fit_into(images, run, config)
                        run = []
                    run.append((used, array))
            rows[i] = used
            used += 1
    finally:
        results.close()   # the decoding processes end here, whatever happened
    _fit_into(images, run, config)
    del run
    if config.resize == "none" and (source_rows >= 0).any():
        sizes.setdefault((size, size), files[int(np.flatnonzero(source_rows >= 0)[0])].name)
    if len(sizes) > 1:
        mix = ", ".join(f"{h}x{w} (e.g. {name})" for (h, w), name in sorted(sizes.items()))
        raise DataError(f"images in {folder} have mixed sizes {mix} and resize='none': "
                        "choose resize='resize' or 'center_crop'")
    if mismatch is not None:
        fit_images(mismatch[None], size, config.channels, config.resize)   # raises: one size, not image_size
    skipped_files = [{"file": names[i], "reason": skipped[i]} for i in sorted(skipped)]
    if not used:
        first = skipped_files[0]
        raise DataError(f"none of the {len(files)} image files in {folder} can be used, e.g. {first['file']} "
                        f"{first['reason']}")
    if skipped_files:
        first = skipped_files[0]
        more = f" and {len(skipped_files) - 1} more" if len(skipped_files) > 1 else ""
        warnings.warn(f"skipped {len(skipped_files)} of {len(files)} image files in {folder}: {first['file']} "
                      f"{first['reason']}{more} (the prepared manifest's skipped_files lists them)", stacklevel=2)

    images = images[:used]
    reused = np.flatnonzero((rows >= 0) & (source_rows >= 0))
    if len(reused):
        images[rows[reused]] = previous.images[source_rows[reused]]
    used = np.flatnonzero(rows >= 0)
    labels = None
    if class_names is not None:   # by the listing's classes: a class whose files were all skipped keeps its index
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[names[i].split(os.sep)[0]] for i in used], dtype=np.int64)
    file_index = {
        "names": np.array(names, dtype=str) if names else np.zeros(0, dtype="<U1"),
        "sizes": np.array([s[0] if s else -1 for s in stats], dtype=np.int64),
        "mtimes": np.array([s[1] if s else -1 for s in stats], dtype=np.int64),
        "sha256": np.frombuffer(b"".join(sha.ljust(32, b"\0") for sha in shas), dtype=np.uint8).reshape(-1, 32),
        "rows": rows,
    }
    return SourceData(images, labels, class_names, {"folder": str(folder), "files": len(used)}, skipped=skipped_files,
                      file_index=file_index, reused_rows=(rows[reused], source_rows[reused]))


def _fit_into(out: np.ndarray, decoded: list[tuple[int, np.ndarray]], config) -> None:
    """Fit decoded images into their rows of `out`, one batched resize per run of images of one shape
    (the same bytes as one image at a time: the kernels treat each image alone)."""
    start = 0
    while start < len(decoded):
        shape = decoded[start][1].shape
        end = start
        while end < len(decoded) and decoded[end][1].shape == shape and end - start < 4096:
            end += 1
        batch = np.stack([array for _, array in decoded[start:end]])
        out[[row for row, _ in decoded[start:end]]] = fit_images(batch, config.image_size, config.channels,
                                                                 config.resize)
        start = end


def _file_entry(path: Path, root: Path, content: bool, name: str | None = None) -> list:
    """[name relative to root, size, mtime] (with `content`: [name, sha256 of the bytes]); a file
    that cannot be read is [name, the error's name], so the identity stays deterministic."""
    name = str(path.relative_to(root)) if name is None else name
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
    listing = hashlib.sha256(repr([_file_entry(f, folder, content, name)
                                   for f, name in zip(files, _relative(files, folder))]).encode()).hexdigest()
    identity = {"kind": "folder", "path": str(folder.resolve()), "files": len(files), "listing_sha256": listing}
    if content:   # a key of its own: a stat listing and a content listing never coincide
        identity["listing"] = "content"
    return identity


# a folder grows (nightly retraining): split by content, so that its train images stay in train
SOURCE = Source("folder:DIR", "required", read_folder, folder_identity, default_split="content", incremental=True)

"""Image sources: read raw data into uint8 arrays (N, C, H, W), verify checksums, download.

One module a kind of source, each registered in SOURCES by one line (a new source: its module,
with `read`, `identity` and `SOURCE = Source(...)`, and its line here).

Source strings (DataConfig.source):
  - "digits"          the 8x8 digits scikit-learn ships (no download).
  - "mnist[:DIR]"     the IDX files (gz or raw) in DIR; every split present (train and/or
                      t10k) is used, concatenated train first (t10k is the official holdout).
                      When DIR holds no split at all, the four .gz files are downloaded into it.
                      Without DIR: <download_dir>/mnist.
  - "cifar10[:PATH]"  the python-pickle archive cifar-10-python.tar.gz (PATH is the archive, a
                      folder holding it, or the extracted cifar-10-batches-py folder); all
                      batches present are used (data_batch_1..5 then test_batch). Downloaded
                      when absent. Without PATH: <download_dir>/cifar10.
  - "folder:DIR"      PNG/JPEG files in DIR (recursively, symbolic links to folders followed).
                      When every image sits in an immediate sub-folder, the sub-folder names are
                      the classes (sorted) and give labels. A file that cannot be used (unreadable,
                      truncated, too small) is skipped, listed in the manifest's `skipped_files`.

Default split (Source.default_split, DataConfig.split when not given): "content" for a folder,
which grows (its train images stay in train as images are added), "random" for the fixed sets.

Checksums: a file's expected md5 comes from, in order, the `checksums` argument, the published
sums, then an MD5SUMS file in its folder (`md5  name` lines: for files no one publishes a sum of;
it never overrides a published one). A file with an expected sum
is always verified (extracted CIFAR batches against the sums torchvision publishes); raw
(un-gzipped) IDX files have no published sum and are checked structurally (magic numbers,
sizes). CIFAR batches are pickles: they are read by an unpickler that loads arrays and never code.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from . import cifar10, digits, folder, mnist
from .base import Source, SourceData, file_digest, md5_file

# The kinds of source by name: DataConfig.source is "<kind>" or "<kind>:<path>".
SOURCES: dict[str, Source] = {
    "digits": digits.SOURCE,
    "mnist": mnist.SOURCE,
    "cifar10": cifar10.SOURCE,
    "folder": folder.SOURCE,
}
SOURCE_KINDS = tuple(SOURCES)


def usage() -> str:
    """"digits, mnist[:DIR], cifar10[:PATH] or folder:DIR": the accepted forms, from SOURCES."""
    forms = [source.usage for source in SOURCES.values()]
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def parse_source(source: str) -> tuple[str, Path | None]:
    """'kind' or 'kind:path' -> (kind, path or None); DataError for an unknown kind or a path
    given to a kind that takes none (or missing where one is needed)."""
    kind, sep, rest = source.partition(":")
    if kind not in SOURCES:
        raise DataError(f"unknown source {source!r}: expected {usage()}")
    takes = SOURCES[kind].path
    if takes == "none" and sep:
        raise DataError(f"source {source!r}: {kind!r} takes no path")
    if takes == "required" and not rest:
        raise DataError(f"source {source!r}: '{kind}:' needs a path, e.g. '{SOURCES[kind].usage}'")
    return kind, (Path(rest).expanduser() if rest else None)


def default_location(kind: str, path: Path | None, download_dir: Path) -> Path | None:
    """The source's path, else <download_dir>/<kind> for a source that downloads, else None."""
    return path if path is not None or not SOURCES[kind].downloads else download_dir / kind


def read_source(config, download_dir: Path, mirrors=None, checksums=None, previous=None,
                workers: int | None = None) -> SourceData:
    """Read the configured source, fitted to (channels, image_size, image_size). `previous` (a
    folder.PreviousVersion) and `workers` go to a source that reads incrementally (Source.incremental:
    a folder); the others read everything each time."""
    kind, path = parse_source(config.source)
    source = SOURCES[kind]
    location = default_location(kind, path, download_dir)
    if source.incremental:
        return source.read(location, config, mirrors, checksums, previous=previous, workers=workers)
    return source.read(location, config, mirrors, checksums)


def source_identity(source: str, download_dir: Path, checksums: dict | None = None) -> dict:
    """What identifies the source's content without reading it all.

    A file with an expected md5 is identified by that md5 (it is verified on read, so a changed
    file fails loudly); other files by name, size and mtime (a folder's by the sha256 of their
    bytes with DDPM_VERIFY_CONTENT=1: see sources/folder.py). Files still to be downloaded are
    identified by their expected md5s, so the identity is the same before and after download.
    """
    kind, path = parse_source(source)
    return SOURCES[kind].identity(default_location(kind, path, download_dir), checksums)


__all__ = ["SOURCES", "SOURCE_KINDS", "Source", "SourceData", "default_location", "file_digest", "md5_file",
           "parse_source", "read_source", "source_identity", "usage"]

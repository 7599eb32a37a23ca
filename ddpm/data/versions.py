"""Dataset versions: each prepared folder is a version of its lineage, with what changed since the last.

A lineage is one DataConfig (its JSON, source string included) prepared in one out_dir: the folder
a nightly retrain prepares again as it grows. Every folder prepare_dataset returns is recorded in
the lineage's history, out_dir/versions/<lineage key>.json, in the order first returned; a
preparation that finds its folder listed already (nothing changed) records nothing new. A folder
prepared before versions existed is recorded the first time a preparation returns it.

An entry (dataset_version and lineage_history add `number`, its 1-based position):
    fingerprint        the prepared content's fingerprint (manifest)
    path               the prepared folder's name, in out_dir
    prepared_at        when its manifest was written (UTC, ISO 8601)
    counts             {"train": ..., "holdout": ...}
    previous           the fingerprint of the lineage's version before it, or null for the first
    added, removed     images added and removed against the previous version, counted by content hash
                       (a multiset: a second copy of an image counts); the first version adds all
    moved_to_holdout   images of the previous train split whose content is now in the holdout (the FID
                       reference then holds images the earlier models trained on): 0 for split="content"
                       by construction; a "random" split that grows moves some
The three counts are null when the previous version's folder is no longer there to compare with.

The history is rewritten atomically (a temporary file renamed over it) under an exclusive lock on
versions/<lineage key>.lock (POSIX flock; without it, two writers at once can lose an entry, never
corrupt the file). Imports neither Prefect nor MLflow.

Aliases: a source state (the prepared folder's name, which hashes the source's identity) whose
preparation gave the content of a folder the lineage has already (a folder re-stamped by a copy
without `-p`, a `touch`) is recorded in versions/<lineage key>.aliases.json as that folder, so the
next preparation of that state finds it without reading a file (prepare.prepared_path).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import DataError
from .prepare import (DATA_FILE, MANIFEST, DataConfig, PreparedDataset, _umask, content_hashes,
                      read_manifest)

VERSIONS_DIR = "versions"
HISTORY_FORMAT = 1


# ---------------------------------------------------------------------------- lineage

def _config_dict(config: DataConfig | dict) -> dict:
    return config.model_dump(mode="json") if isinstance(config, DataConfig) else dict(config)


def lineage_key(config: DataConfig | dict) -> str:
    """<kind>-<S>x<S>x<C>-<hash12 of the config's JSON>: the name of the lineage's history file.

    `config`: a DataConfig or the `config` of a prepared folder's manifest (the same JSON)."""
    values = _config_dict(config)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    size = values["image_size"]
    return f"{values['source'].partition(':')[0]}-{size}x{size}x{values['channels']}-{digest}"


def history_path(config: DataConfig | dict, out_dir: Path) -> Path:
    """out_dir/versions/<lineage key>.json (it may not exist yet)."""
    return Path(out_dir) / VERSIONS_DIR / f"{lineage_key(config)}.json"


def _read_history(file: Path) -> list[dict]:
    try:
        history = json.loads(file.read_text())
        return list(history["versions"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the dataset version history {file}: {exc}; fix or delete it "
                        "(deleting starts the lineage's history again)") from exc


def _numbered(entries: list[dict]) -> list[dict]:
    return [{**entry, "number": i + 1} for i, entry in enumerate(entries)]


def lineage_history(config: DataConfig | dict, out_dir: Path) -> list[dict]:
    """The versions of `config`'s lineage in out_dir, oldest first, each with its `number`
    ([] when nothing was recorded)."""
    return _numbered(_read_history(history_path(config, out_dir)))


def _folder(dataset_or_path: PreparedDataset | Path | str) -> tuple[Path, dict]:
    """(absolute folder path, manifest)"""
    if isinstance(dataset_or_path, PreparedDataset):
        return Path(os.path.abspath(dataset_or_path.path)), dataset_or_path.manifest
    path = Path(os.path.abspath(dataset_or_path))
    return path, read_manifest(path)


def dataset_version(dataset_or_path: PreparedDataset | Path | str) -> dict | None:
    """The history entry of a prepared folder, with `number` (its 1-based position in its lineage);
    None when no history lists it (it was never returned by prepare_dataset since versions exist,
    or its history was deleted)."""
    path, manifest = _folder(dataset_or_path)
    for entry in lineage_history(manifest["config"], path.parent):
        if entry["path"] == path.name and entry["fingerprint"] == manifest["fingerprint"]:
            return entry
    return None


# ---------------------------------------------------------------------------- recording

@contextlib.contextmanager
def _locked(file: Path):
    """An exclusive lock on file's .lock sibling (no lock where flock does not exist)."""
    try:
        import fcntl
    except ImportError:   # not POSIX: the atomic rename still keeps the file whole
        yield
        return
    with open(file.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_history(file: Path, config: dict, entries: list[dict]) -> None:
    """Write the history to a temporary file beside it and rename it over the old one."""
    body = json.dumps({"format": HISTORY_FORMAT, "lineage": file.stem, "config": config, "versions": entries},
                      indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it 0600
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_hashes(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(content hashes, train indices, holdout indices) of a prepared folder, reading the images
    only when it stores no hashes (prepared before they were)."""
    with np.load(path / DATA_FILE, allow_pickle=False) as npz:
        train, holdout = npz["train_indices"], npz["holdout_indices"]
        hashes = npz["content_hashes"] if "content_hashes" in npz.files else content_hashes(npz["images"])
    return hashes, train, holdout


def version_changes(previous: tuple | None, current: tuple) -> dict:
    """{added, removed, moved_to_holdout} of `current` against `previous`, each a
    (content hashes uint8 (N, 16), train indices, holdout indices); previous None: all added."""
    hashes, _, holdout = current
    now = Counter(row.tobytes() for row in np.asarray(hashes))
    if previous is None:
        return {"added": sum(now.values()), "removed": 0, "moved_to_holdout": 0}
    old_hashes, old_train, _ = previous
    old_hashes = np.asarray(old_hashes)
    before = Counter(row.tobytes() for row in old_hashes)
    was_train = Counter(row.tobytes() for row in old_hashes[np.asarray(old_train)])
    in_holdout = Counter(row.tobytes() for row in np.asarray(hashes)[np.asarray(holdout)])
    return {"added": sum((now - before).values()), "removed": sum((before - now).values()),
            "moved_to_holdout": sum(min(count, was_train[h]) for h, count in in_holdout.items())}


def record_version(dataset_or_path: PreparedDataset | Path | str, *, hashes: np.ndarray | None = None,
                   train: np.ndarray | None = None, holdout: np.ndarray | None = None,
                   manifest: dict | None = None) -> dict:
    """Record a prepared folder (out_dir/<name>) in its lineage's history unless listed already;
    return its entry with `number`. prepare_dataset calls it for every folder it returns.

    hashes, train, holdout, manifest: the folder's, when the caller has them in memory (else they
    are read from the folder)."""
    if manifest is None:
        path, manifest = _folder(dataset_or_path)
    else:
        path = Path(os.path.abspath(dataset_or_path.path if isinstance(dataset_or_path, PreparedDataset)
                                    else dataset_or_path))
    if hashes is None or train is None or holdout is None:
        if isinstance(dataset_or_path, PreparedDataset):
            data = dataset_or_path
            hashes = (data.content_hashes.numpy() if data.content_hashes is not None
                      else content_hashes(data.images.numpy()))
            train, holdout = data.train_indices.numpy(), data.holdout_indices.numpy()
        else:
            hashes, train, holdout = _split_hashes(path)
    out_dir, config = path.parent, manifest["config"]
    file = history_path(config, out_dir)
    file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(file):
        entries = _read_history(file)
        for entry in _numbered(entries):
            if entry["path"] == path.name and entry["fingerprint"] == manifest["fingerprint"]:
                return entry
        previous = entries[-1] if entries else None
        if previous is None:
            changes = version_changes(None, (hashes, train, holdout))
        else:
            try:
                changes = version_changes(_split_hashes(out_dir / previous["path"]), (hashes, train, holdout))
            except Exception:   # the previous folder was deleted or damaged: nothing to compare with
                changes = {"added": None, "removed": None, "moved_to_holdout": None}
        written = (path / MANIFEST).stat().st_mtime
        entry = {
            "fingerprint": manifest["fingerprint"],
            "path": path.name,
            "prepared_at": datetime.fromtimestamp(written, timezone.utc).isoformat(timespec="seconds"),
            "counts": {"train": int(len(train)), "holdout": int(len(holdout))},
            "previous": previous["fingerprint"] if previous else None,
            **changes,
        }
        _write_history(file, config, entries + [entry])
    return {**entry, "number": len(entries) + 1}


# ---------------------------------------------------------------------------- incremental preparation

def _aliases_path(config: DataConfig | dict, out_dir: Path) -> Path:
    return Path(out_dir) / VERSIONS_DIR / f"{lineage_key(config)}.aliases.json"


def _read_aliases(file: Path) -> dict[str, str]:
    try:
        return dict(json.loads(file.read_text())["aliases"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}   # a cache of what a preparation would find again: unreadable, it is rebuilt


def alias_of(config: DataConfig | dict, out_dir: Path, name: str) -> str | None:
    """The lineage folder recorded for the prepared-folder name `name`, when it still exists."""
    folder = _read_aliases(_aliases_path(config, out_dir)).get(name)
    return folder if folder and (Path(out_dir) / folder / MANIFEST).is_file() else None


def record_alias(config: DataConfig | dict, out_dir: Path, name: str, folder: str) -> None:
    """Record that the source state named `name` prepares to the existing lineage folder `folder`."""
    file = _aliases_path(config, out_dir)
    file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(history_path(config, out_dir)):
        aliases = {key: value for key, value in _read_aliases(file).items() if (Path(out_dir) / value).is_dir()}
        aliases[name] = folder
        body = json.dumps({"format": HISTORY_FORMAT, "aliases": aliases}, indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def incremental_base(config: DataConfig, out_dir: Path, tries: int = 3):
    """The lineage's newest intact version that stored a file index, as a folder.PreviousVersion
    (its images memory-mapped), for the next version's incremental preparation; None when there is none."""
    from .prepare import load_prepared, read_file_index
    from .sources.folder import FILE_INDEX_KEYS, PreviousVersion

    try:
        entries = _read_history(history_path(config, out_dir))
    except DataError:
        return None
    for entry in list(reversed(entries))[:tries]:
        folder = Path(out_dir) / entry["path"]
        try:
            index = read_file_index(folder)
            if index is None or not set(FILE_INDEX_KEYS) <= set(index):
                continue
            dataset = load_prepared(folder)
        except DataError:
            continue
        if dataset.fingerprint == entry["fingerprint"] and len(index["rows"]) and \
                int(index["rows"].max(initial=-1)) < len(dataset.images):
            return PreviousVersion(index, dataset.images.numpy())
    return None


_SAME_CONTENT_KEYS = ("fingerprint", "skipped_files", "class_names", "source_details", "config", "count", "splits")


def same_version(config: DataConfig, out_dir: Path, manifest: dict) -> Path | None:
    """An intact folder of the lineage whose content is `manifest`'s (fingerprint, skipped files,
    classes, counts): what a preparation returns instead of writing a copy of it; None when none is."""
    from .prepare import load_prepared

    try:
        entries = _read_history(history_path(config, out_dir))
    except DataError:
        return None
    for entry in reversed(entries):
        if entry["fingerprint"] != manifest["fingerprint"]:
            continue
        folder = Path(out_dir) / entry["path"]
        try:
            found = load_prepared(folder)
        except DataError:
            continue
        if all(found.manifest.get(key) == manifest.get(key) for key in _SAME_CONTENT_KEYS):
            return folder
    return None


__all__ = ["VERSIONS_DIR", "alias_of", "incremental_base", "record_alias", "same_version", "dataset_version", "history_path", "lineage_history", "lineage_key",
           "record_version", "version_changes"]

"""Disk space: how much a run's checkpoints need, checked before they are written, and a full
disk told apart from other write failures.

A long run's checkpoints are what fills a disk. Every writer of them (the pipeline before a run
exists, the Trainer before it trains, `save_checkpoint` for each file) checks the space it needs
first, and a write that fails on a full disk raises `DiskFull`: one line saying where, how much
is free and how much was needed, never the storage layer's own words (torch.save says
"unexpected pos 576 vs 534", sqlite "database or disk is full" five layers down).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

# What a full disk looks like when the layer that met it kept no errno: sqlite (through
# SQLAlchemy and MLflow), the C library's text inside other messages, and a DiskFull that
# crossed a process boundary as text (a torchrun worker's error).
FULL_DISK_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded", "diskfull:")
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """The disk a run writes to has no room for what it must write next (errno ENOSPC)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):   # OSError's would call DiskFull(errno, message): Dask and copy need this
        return type(self), (self.strerror,)


class NotWritable(OSError):
    """A folder a run must write to cannot be written (read-only, not ours)."""

    def __str__(self) -> str:
        return self.strerror


def check_writable(folder: Path | str, what: str) -> None:
    """NotWritable, naming `what` and `folder`, unless `folder` exists (or is created now) and takes a file."""
    folder = Path(folder)
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise NotWritable(error.errno, f"{what} {folder} cannot be written: {error.strerror or error}") from None


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def existing_parent(path: Path | str) -> Path:
    """`path`, or its nearest ancestor that exists (a folder not created yet lives on its parent's disk)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path | str) -> int:
    """Bytes a process may still write on the filesystem holding `path` (created or not)."""
    return shutil.disk_usage(existing_parent(path)).free


def check_free_space(path: Path | str, needed: int, what: str, hint: str = "") -> None:
    """DiskFull, before any of it is written, when the filesystem of `path` has less than `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFull(f"not enough disk space for {what}: it needs {mib(needed)} but the disk holding "
                       f"{existing_parent(path)} has {mib(free)} free{hint}")


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and every error it was raised from or while handling (both links, depth first)."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [error.__context__, error.__cause__]


def full_disk_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says the disk is full (or the quota exhausted): a DiskFull
    (it says where and how much) if there is one, else the innermost (the storage layer's own)."""
    found = [e for e in exception_chain(error) if (isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS)
             or any(text in str(e).lower() for text in FULL_DISK_TEXTS)]
    return next((e for e in found if isinstance(e, DiskFull)), found[-1] if found else None)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or any error it was raised from, is a full disk or an exhausted quota."""
    return full_disk_error(error) is not None


def tensor_bytes(state) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples): what saving it writes, give or take its index."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path | str, write, what: str, size_hint: int = 0) -> Path:
    """Write the file `path` whole or not at all: `write(tmp)` fills a temporary file beside it
    (same folder, so the rename cannot cross a disk), which then replaces `path` in one rename.

    The one writer of the caches under DDPM_HOME (classifier weights, reference features, floors):
    readers never see half a file, and nothing half-written is left under the real name (nor the
    temporary file). The file takes the umask's permissions like any other file (mkstemp's 0600
    would hide a shared cache from the team). A write that fails on a full disk raises DiskFull
    (one line: where, what, how much is free), also when the layer that met it kept no errno
    (torch.save's "unexpected pos"): the free space, below `size_hint` bytes, tells.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error) or free_bytes(path.parent) < max(size_hint, 1):
            raise DiskFull(f"the disk holding {path.parent} is full: {what} could not be written "
                           f"({mib(free_bytes(path.parent))} free{', ' + mib(size_hint) + ' needed' if size_hint else ''})"
                           ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""Checkpoints on disk: written atomically, verified by checksum, loaded without pickle.

A checkpoint is `step-XXXXXXX.pt` (a torch file of tensors and plain Python values, loadable with
`torch.load(weights_only=True)`) next to `step-XXXXXXX.pt.sha256`. Writing goes to a temporary
file that is renamed into place, so a crash mid-write never leaves a half file under the real
name; the checksum catches files damaged later.

This module is the one home of checkpoint knowledge: the file name (`checkpoint_path`,
`checkpoint_step`), discovery (`list_checkpoints`, `latest_valid_checkpoint`), verification,
the EMA weights inside a training checkpoint (`ema_weights`) and loading a model for sampling
(`load_model`).

A damaged checkpoint found when resuming is never deleted nor overwritten: it is renamed to
`step-XXXXXXX.pt.corrupt` (with its checksum file), out of the way of the step's next save and
of keep_last pruning, and kept for inspection.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from ddpm.diffusion import DiffusionConfig
from ddpm.disk import DiskFull, check_free_space, free_bytes, is_disk_full, mib, tensor_bytes
from ddpm.unet import UNet, UNetConfig

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.pt$")
INDEX_BYTES = 1 << 20   # a torch file's zip index, pickled configs and the checksum file, generously


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:07d}.pt"


def checkpoint_step(path: Path | str) -> int:
    """The training step of checkpoint file `path` (`step-0001500.pt` -> 1500)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint file name (step-XXXXXXX.pt)")
    return int(match.group(1))


def save_checkpoint(state: dict, directory: Path, step: int, keep_last: int | None = None) -> Path:
    """Write `state` as the checkpoint of `step`; then keep only the newest `keep_last`."""
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    needed = tensor_bytes(state) + INDEX_BYTES
    kept = f"; the checkpoints already there are untouched: {_newest(directory)}"
    check_free_space(directory, needed, f"checkpoint {path}", kept)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        checksum = file_sha256(tmp)
        # the checksum first: a checkpoint without a valid checksum file is never trusted
        _atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{checksum}  {path.name}\n".encode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:   # torch.save's RuntimeError names no cause: the free space tells
        tmp.unlink(missing_ok=True)
        if not path.exists():
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)   # a checksum without its file
        if is_disk_full(error) or free_bytes(directory) < needed:
            raise DiskFull(f"the disk filled while writing checkpoint {path} ({mib(needed)}; "
                           f"{mib(free_bytes(directory))} free now){kept}") from error
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if keep_last:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def _newest(directory: Path) -> str:
    """The newest checkpoint in `directory`, for a message."""
    found = list_checkpoints(directory)
    return f"the newest is {found[-1].name}" if found else "there are none yet"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)), key=checkpoint_step)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` exists and matches its recorded sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; refusing to trust it")
    expected = sidecar.read_text().split()[0]
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: sha256 {actual[:12]}... does not match the recorded {expected[:12]}..."
        )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify and load one checkpoint (tensors and plain values only: weights_only=True)."""
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a file that passes the checksum but still does not load
        raise CheckpointError(f"checkpoint {path} could not be loaded ({_unloadable(error)})") from error


def quarantine_checkpoint(path: Path) -> Path:
    """Rename a damaged checkpoint (and its checksum file) to `<name>.corrupt[-N]`; returns the new path.

    Nothing is deleted: the bytes stay on disk for inspection, under a name that neither
    list_checkpoints nor a later save of the same step can touch.
    """
    path = Path(path)
    suffix, n = ".corrupt", 0
    while path.with_name(path.name + suffix).exists():
        n += 1
        suffix = f".corrupt-{n}"
    target = path.with_name(path.name + suffix)
    if path.exists():
        os.replace(path, target)
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists():
        os.replace(sidecar, path.with_name(path.name + ".sha256" + suffix))
    return target


def check_loadable(path: Path) -> None:
    """CheckpointError unless the file unpickles (tensors memory-mapped, so this reads little): a
    file can match its checksum and still not load (written by a broken or incompatible writer)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} could not be loaded ({_unloadable(error)})") from error


def _unloadable(error: Exception) -> str:
    """Why torch.load refused a file, in words a user can act on: its own message ("pop from empty
    list", "invalid load key") names the unpickler's state, not the file's problem."""
    return (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}; it is not a "
            "torch checkpoint written by this project, or it was damaged before its checksum was recorded")


def latest_valid_checkpoint(directory: Path, warn=print, quarantine: bool = False) -> Path | None:
    """The newest checkpoint in `directory` whose checksum holds and that loads; damaged ones are
    reported and skipped.

    With `quarantine`, each damaged checkpoint passed over is also renamed `*.corrupt` (see
    quarantine_checkpoint), so that resuming and saving that step again cannot overwrite it.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            check_loadable(path)
            return path
        except CheckpointError as error:
            if quarantine:
                moved = quarantine_checkpoint(path)
                warn(f"skipping {error}; kept it as {moved.name}")
            else:
                warn(f"skipping {error}")
    return None


def ema_weights(state: dict) -> dict[str, torch.Tensor]:
    """The EMA model's weights of a training checkpoint, as the UNet's own state dict: the
    AveragedModel keys are 'module.<name>' beside its 'n_averaged' counter."""
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}


def load_model(checkpoint: Path | str, use_ema: bool = True,
               device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig, dict]:
    """A UNet (EMA weights by default) ready for sampling, its diffusion config, and the raw state."""
    state = load_checkpoint(Path(checkpoint), map_location=device)
    try:
        model_config = UNetConfig(**state["model_config"])
        diffusion_config = DiffusionConfig(**state["diffusion_config"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {checkpoint} holds no valid configuration: {error}") from error
    model = UNet(model_config)
    try:
        model.load_state_dict(ema_weights(state) if use_ema else state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match its model config {model_config.model_dump()}: {error}"
        ) from error
    return model.to(device).eval(), diffusion_config, state

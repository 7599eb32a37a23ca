"""Where a run's files are: the one place every reader asks for a run's checkpoints, post-hoc EMA
snapshots and prepared data, on this host or in the tracking store.

A run trained on host A is evaluated, promoted, resumed or warm-started on host B that shares only
the tracking server with it. So a training run publishes what those steps need to its artifact
store, and every reader takes the local copy when it is there and valid, else fetches it:

    published by training (CheckpointPublisher, a background thread: training never waits on it)
        checkpoints/step-XXXXXXX.pt (+ .sha256)            the checkpoints it keeps (train.keep_last
                                                           applies in the store too)
        checkpoints/posthoc-ema/step-XXXXXXX.pt (+ .sha256) post-hoc EMA snapshots
        tag checkpoints.stored                              the steps that reached the store
    prepared data, by fingerprint (publish_dataset)
        experiment ddpm-datasets, one run per fingerprint:  prepared/manifest.json, prepared/data.npz
    readers (checkpoints, checkpoint, snapshot_folder, run_dataset)
        local and valid -> used as it is; else downloaded into $DDPM_HOME/runs/<run>/checkpoints or
        $DDPM_HOME/cache/datasets/<fingerprint>, verified (sha256, the data's fingerprint), fetched
        once more when the check fails, then one line naming the file.

The config (config.json) and registered models already live in the store (tracking.run_config,
MLflow's models:/ URIs). Publishing is on when MLflow is a tracking server (http, https) and off on
the embedded sqlite store, where every reader is on this host (DDPM_PUBLISH_CHECKPOINTS=on|off|auto
overrides). ddpm/ knows nothing of this: it takes and writes plain local paths.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.exceptions import MlflowException

from ddpm.checkpoint import (CheckpointError, checkpoint_path, checkpoint_step, list_checkpoints, quarantine_checkpoint,
                             verify_checkpoint)
from ddpm.data import DataError, load_prepared, read_manifest
from ddpm.disk import DiskFull, check_free_space, is_disk_full
from ddpm.errors import one_line
from ddpm.posthoc_ema import SNAPSHOT_FOLDER
from tasks import contract, settings, tracking

log = logging.getLogger(__name__)

UPLOAD_TRIES = 3                  # per file, with RETRY_SECONDS between tries
RETRY_SECONDS = (1.0, 4.0)
DOWNLOAD_TRIES = 2                # a download whose checksum fails is fetched once more


class StoreFileError(FileNotFoundError):
    """A file a reader needs is neither valid on this host nor fetchable from the tracking store."""


def publishing(uri: str | None = None) -> bool:
    """Whether runs publish their checkpoints and data to the artifact store: on for a tracking
    server (other hosts read from it), off for a local store; DDPM_PUBLISH_CHECKPOINTS overrides."""
    choice = os.environ.get("DDPM_PUBLISH_CHECKPOINTS", "auto").strip().lower()
    if choice in ("on", "1", "true", "yes"):
        return True
    if choice in ("off", "0", "false", "no"):
        return False
    return settings.is_tracking_server(uri or settings.tracking_uri())


def _artifact_dir(relative_folder: str) -> str:
    """checkpoints[/posthoc-ema]: where a run's checkpoint files live in its artifacts."""
    return contract.CHECKPOINTS_ARTIFACT_DIR + (f"/{relative_folder}" if relative_folder else "")


# --- publishing (training's side) ---------------------------------------------------------------


class CheckpointPublisher:
    """Uploads a run's checkpoints (and post-hoc EMA snapshots) to its artifact store in a background
    thread, as training writes them: `publisher(step, path)` is an on_checkpoint callback.

    Each file is hard-linked into a staging folder at once (free, and keep_last pruning on disk can
    then not pull it away mid-upload), uploaded with its checksum file after it (a reader trusts only
    a pair), tried UPLOAD_TRIES times; a failure is one warning line and training goes on. Once a
    checkpoint is stored, the stored ones beyond `keep_last` are deleted from the store, and the tag
    `checkpoints.stored` lists the steps the store holds. `close()` waits for the queue, retries
    what failed, and returns the stored steps: the run records honestly what reached the store.
    """

    def __init__(self, run_id: str, checkpoint_dir: Path | str, keep_last: int, warn: Callable[[str], None] = None):
        self.run_id, self.checkpoint_dir, self.keep_last = run_id, Path(checkpoint_dir), keep_last
        self.warn = warn or log.warning
        self.staging = settings.run_dir(run_id) / ".publishing"
        self.stored: list[int] = stored_steps(run_id)   # a resumed run: what earlier attempts stored
        self.stored_snapshots: set[str] = set()
        self.failed: dict[int, str] = {}
        self.bytes_uploaded = 0
        self.upload_seconds = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"publish-{run_id[:8]}", daemon=True)
        self._thread.start()

    def __call__(self, step: int, path: Path) -> None:
        self._queue.put((step, self._stage(Path(path))))

    def _stage(self, path: Path) -> Path:
        folder = self.staging / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for source in (path, path.with_name(path.name + ".sha256")):
            target = folder / source.name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:   # another filesystem, or no hard links there: a copy
                shutil.copy2(source, target)
        return folder / path.name

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._publish(*item)
            except Exception as error:  # noqa: BLE001 (never kill the thread: training goes on)
                self.warn(f"publishing to the artifact store failed: {one_line(error)}")
            finally:
                self._queue.task_done()

    def _publish(self, step: int, staged: Path) -> None:
        try:
            self._upload_pair(staged, _artifact_dir(""))
        except Exception as error:  # noqa: BLE001 (a server down, a full store, a timeout: all alike)
            self.failed[step] = one_line(error)
            self._delete(step)   # a half-written copy there is no checkpoint (and would hold space)
            self.warn(f"checkpoint step {step} did not reach the artifact store ({self.failed[step]}); training goes "
                      "on, the upload is tried again at the end of the run")
            return
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
        self.failed.pop(step, None)
        self.stored = sorted(set(self.stored) | {step})
        self._sync_snapshots()
        self._prune()
        self._record()

    def _upload_pair(self, path: Path, artifact_dir: str) -> None:
        started = time.perf_counter()
        for file in (path, path.with_name(path.name + ".sha256")):   # the checksum last: a pair is complete
            for attempt in range(UPLOAD_TRIES):
                try:
                    tracking.client().log_artifact(self.run_id, str(file), artifact_dir)
                    break
                except Exception:  # noqa: BLE001
                    if attempt == UPLOAD_TRIES - 1:
                        raise
                    time.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
            self.bytes_uploaded += file.stat().st_size
        self.upload_seconds += time.perf_counter() - started

    def _sync_snapshots(self) -> None:
        """Upload the post-hoc EMA snapshots written since the last sync (they are never pruned)."""
        for snapshot in list_checkpoints(self.checkpoint_dir / SNAPSHOT_FOLDER):
            key = f"{snapshot.name}:{snapshot.stat().st_mtime_ns}"
            if key in self.stored_snapshots:
                continue
            staged = self._stage(snapshot)
            try:
                self._upload_pair(staged, _artifact_dir(SNAPSHOT_FOLDER))
                self.stored_snapshots.add(key)
            finally:
                shutil.rmtree(staged.parent, ignore_errors=True)

    def _prune(self) -> None:
        """keep_last in the store: the oldest stored checkpoints beyond it are deleted there."""
        excess, self.stored = self.stored[:-self.keep_last], self.stored[-self.keep_last:]
        if not excess:
            return
        for step in excess:
            self._delete(step, warn=True)

    def _delete(self, step: int, warn: bool = False) -> None:
        """Delete checkpoint `step` (and its checksum) from the store, best effort."""
        name = checkpoint_path(Path(), step).name
        for file in (name + ".sha256", name):   # the checksum first: never a pair with a missing file
            try:
                _repository(self.run_id).delete_artifacts(f"{_artifact_dir('')}/{file}")
            except Exception as error:  # noqa: BLE001 (a store that cannot delete keeps more: only space)
                if warn:
                    self.warn(f"could not delete {file} from the artifact store ({one_line(error)})")

    def _record(self) -> None:
        tracking.client().set_tag(self.run_id, contract.CHECKPOINTS_STORED_TAG,
                                  ",".join(map(str, self.stored)) or "none")

    def close(self, timeout: float = 600.0) -> list[int]:
        """Finish every upload (those that failed are tried once more, newest kept first); the steps
        the store holds. A checkpoint that still did not reach it is named in the tag
        `checkpoints.store_error` and one warning line."""
        self._queue.put(None)
        self._thread.join(timeout)
        for step in sorted(self.failed):
            path = checkpoint_path(self.checkpoint_dir, step)
            if step in self.stored or not path.is_file():
                self.failed.pop(step)
                continue
            try:
                self._upload_pair(self._stage(path), _artifact_dir(""))
                self.failed.pop(step)
                self.stored = sorted(set(self.stored) | {step})
            except Exception as error:  # noqa: BLE001
                self.failed[step] = one_line(error)
            finally:
                shutil.rmtree(self.staging / path.stem, ignore_errors=True)
        try:
            self._sync_snapshots()
            self._prune()
            self._record()
            mlflow_client = tracking.client()
            if self.failed:
                said = "; ".join(f"step {step}: {why}" for step, why in sorted(self.failed.items()))
                mlflow_client.set_tag(self.run_id, contract.CHECKPOINTS_STORE_ERROR_TAG, said[:4000])
                self.warn(f"{len(self.failed)} checkpoint(s) never reached the artifact store ({said}); the run's "
                          f"tag {contract.CHECKPOINTS_STORED_TAG} lists those that did")
            elif contract.CHECKPOINTS_STORE_ERROR_TAG in mlflow_client.get_run(self.run_id).data.tags:
                mlflow_client.delete_tag(self.run_id, contract.CHECKPOINTS_STORE_ERROR_TAG)
        except Exception as error:  # noqa: BLE001 (the store gone at the very end: said, not raised)
            self.warn(f"the artifact store could not be updated at the end of the run ({one_line(error)})")
        shutil.rmtree(self.staging, ignore_errors=True)
        return list(self.stored)


def stored_steps(run_id: str) -> list[int]:
    """The checkpoint steps of `run_id` whose file and checksum are both in its artifact store."""
    try:
        files = {Path(f.path).name for f in tracking.client().list_artifacts(run_id, _artifact_dir(""))}
    except Exception:  # noqa: BLE001 (no artifacts yet, or none fetchable: nothing stored)
        return []
    return sorted(checkpoint_step(name) for name in files
                  if name.endswith(".pt") and name.startswith("step-") and name + ".sha256" in files)


def _repository(run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = tracking.client().get_run(run_id)
    return get_artifact_repository(run.info.artifact_uri, tracking_uri=settings.tracking_uri())


# --- reading (every other step's side) ----------------------------------------------------------


def checkpoint_folders(run) -> list[Path]:
    """Where a run's checkpoints may be on this host: its `checkpoint_dir` tag (the folder it trained
    in, when that was this host), then $DDPM_HOME/runs/<run id>/checkpoints (fetched copies)."""
    tagged = run.data.tags.get(contract.CHECKPOINT_DIR_TAG)
    default = settings.ddpm_home() / "runs" / run.info.run_id / "checkpoints"
    return [Path(tagged), default] if tagged and Path(tagged) != default else [default]


def local_folder(run) -> Path:
    """This host's folder for the run's checkpoints: the one its `checkpoint_dir` tag names when
    that holds checkpoints here (trained on this host), else $DDPM_HOME/runs/<run>/checkpoints,
    where fetched ones go."""
    for folder in checkpoint_folders(run):
        if list_checkpoints(folder):
            return folder
    return checkpoint_folders(run)[-1]


def checkpoints(run, fetch: bool = True) -> list[Path]:
    """The run's checkpoints, oldest first: those on this host (a damaged one replaced by the store's
    copy when it has one); when there are none here, every one its artifact store holds, fetched and
    verified ([] when neither has any)."""
    folder = local_folder(run)
    if found := list_checkpoints(folder):
        return [_valid_or_fetched(run, path) if fetch else path for path in found]
    if not fetch:
        return []
    return [_fetch(run.info.run_id, "", step, folder) for step in stored_steps(run.info.run_id)]


def checkpoint(run, step: int | None = None) -> Path | None:
    """One checkpoint of the run (None: the newest), here and valid, else fetched from the store;
    None when neither has it."""
    folder = local_folder(run)
    local = {checkpoint_step(p): p for p in list_checkpoints(folder)}
    if local and (step is None or step in local):
        return _valid_or_fetched(run, local[max(local) if step is None else step])
    stored = stored_steps(run.info.run_id)
    if not stored or (step is not None and step not in stored):
        return None
    return _fetch(run.info.run_id, "", max(stored) if step is None else step, folder)


def _valid_or_fetched(run, path: Path) -> Path:
    """`path` when it matches its checksum; else the store's copy of it, fetched (the damaged one kept
    as *.corrupt); else `path` as it is, for its loader to say what is wrong with it."""
    try:
        verify_checkpoint(path)
        return path
    except CheckpointError:
        if checkpoint_step(path) not in stored_steps(run.info.run_id):
            return path
    return _fetch(run.info.run_id, "", checkpoint_step(path), path.parent)


def newest_valid_checkpoint(run, warn: Callable[[str], None] = print) -> Path | None:
    """For a resume on any host: the folder to train in, holding the newest valid checkpoint.
    Here when this host has a valid one; else the newest stored checkpoint that verifies, fetched
    (with the snapshots up to its step, for a post-hoc EMA run). None when neither has one."""
    from ddpm.checkpoint import latest_valid_checkpoint

    folder = local_folder(run)
    if list_checkpoints(folder):
        return latest_valid_checkpoint(folder, warn=warn)
    for step in reversed(stored_steps(run.info.run_id)):
        try:
            path = _fetch(run.info.run_id, "", step, folder)
        except StoreFileError as error:
            warn(f"skipping {error}")
            continue
        snapshot_folder(run, upto=step)
        return path
    return None


def snapshot_folder(run, upto: int | None = None) -> Path:
    """The run's checkpoint folder on this host with its post-hoc EMA snapshots in it (fetched when
    none are here; with `upto`, only those up to that step)."""
    from ddpm.posthoc_ema import list_snapshots, snapshot_dir

    folder = local_folder(run)
    if list_snapshots(folder):
        return folder
    try:
        names = {Path(f.path).name for f in tracking.client().list_artifacts(run.info.run_id,
                                                                             _artifact_dir(SNAPSHOT_FOLDER))}
    except Exception:  # noqa: BLE001
        names = set()
    steps = sorted(checkpoint_step(n) for n in names if n.endswith(".pt") and n + ".sha256" in names)
    for step in steps:
        if upto is None or step <= upto:
            _fetch(run.info.run_id, SNAPSHOT_FOLDER, step, snapshot_dir(folder))
    return folder


def _fetch(run_id: str, relative_folder: str, step: int, folder: Path) -> Path:
    """Download checkpoint `step` (and its checksum) of the run's artifacts into `folder`, verified;
    a copy that fails its checksum is fetched once more; StoreFileError naming the file after that."""
    target = checkpoint_path(folder, step)
    if target.is_file():
        try:
            verify_checkpoint(target)
            return target
        except CheckpointError:   # a damaged copy here: kept aside for inspection, fetched again below
            quarantine_checkpoint(target)
    remote = f"{_artifact_dir(relative_folder)}/{target.name}"

    def download(tmp: str) -> Path:
        for suffix in (".sha256", ""):   # the checksum, then the file beside it
            fetched = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=remote + suffix,
                                                               dst_path=tmp, tracking_uri=settings.tracking_uri()))
        return fetched

    def install(fetched: Path) -> Path:
        os.replace(fetched.with_name(fetched.name + ".sha256"), target.with_name(target.name + ".sha256"))
        os.replace(fetched, target)
        return target

    return _fetch_verified(f"{remote} of MLflow run {run_id}", folder, _artifact_size(run_id, remote), download,
                           verify_checkpoint, install)


def _fetch_verified(what: str, folder: Path, size: int | None, download: Callable[[str], Path],
                    verify: Callable[[Path], object], install: Callable[[Path], Path]) -> Path:
    """The one way a reader fetches: `download(tmp)` into a temporary folder on `folder`'s disk (its
    space checked first when `size` is known), `verify` the copy (CheckpointError or DataError when
    it is damaged: fetched once more), `install` it. A full disk is one DiskFull line; a store
    that lacks the file or cannot be reached is not asked again; StoreFileError names `what`."""
    hint = "; free space or set DDPM_HOME to a larger disk"
    folder.mkdir(parents=True, exist_ok=True)
    if size is not None:
        check_free_space(folder, size + (1 << 20), what, hint)
    problem = ""
    for _ in range(DOWNLOAD_TRIES):
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            try:
                fetched = download(tmp)
                verify(fetched)
            except (CheckpointError, DataError) as error:
                problem = one_line(error)
                continue
            except (MlflowException, OSError) as error:
                if is_disk_full(error):
                    raise DiskFull(f"the disk holding {folder} filled while fetching {what}{hint}") from None
                problem = one_line(error)
                break   # not there, or the store unreachable: fetching again will not help
            return install(fetched)
    raise StoreFileError(f"{what} could not be fetched from the artifact store: {problem}")


def _artifact_size(run_id: str, remote: str) -> int | None:
    parent = remote.rsplit("/", 1)[0]
    try:
        for info in tracking.client().list_artifacts(run_id, parent):
            if info.path == remote:
                return info.file_size
    except Exception:  # noqa: BLE001
        pass
    return None


# --- prepared data, by fingerprint ----------------------------------------------------------------


def _dataset_runs(fingerprint: str) -> list:
    mlflow_client = tracking.client()
    experiment = mlflow_client.get_experiment_by_name(contract.DATASETS_EXPERIMENT)
    if experiment is None:
        return []
    return mlflow_client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{contract.DATASET_FINGERPRINT_TAG}` = '{fingerprint}' AND attributes.status = 'FINISHED'")


def publish_dataset(dataset_path: Path | str) -> str | None:
    """Upload a prepared folder to the store, keyed by its fingerprint, unless it is there already
    (a run of the experiment `ddpm-datasets`); the run id, None when not publishing."""
    if not publishing():
        return None
    manifest = read_manifest(Path(dataset_path))
    fingerprint = manifest["fingerprint"]
    if found := _dataset_runs(fingerprint):
        return found[0].info.run_id
    with tracking.store_lock(f"publish-data-{fingerprint[:16]}"):
        run_id = tracking.create_run(contract.DATASETS_EXPERIMENT, f"{manifest['source']}-{fingerprint[:12]}", {},
                                     tags={contract.DATASET_FINGERPRINT_TAG: fingerprint})
        mlflow_client = tracking.client()
        for name in ("manifest.json", "data.npz"):
            mlflow_client.log_artifact(run_id, str(Path(dataset_path) / name), contract.DATASET_ARTIFACT_DIR)
        mlflow_client.set_terminated(run_id)
    return run_id


def run_dataset(run, data_config=None) -> str:
    """The prepared data run `run` trained on (its fingerprint), as a local folder (`dataset`, the
    folder its tag names tried first). A run from before fingerprints: its folder, else `data_config`
    prepared here."""
    tags = run.data.tags
    fingerprint, tagged = tags.get(contract.DATASET_FINGERPRINT_TAG), tags.get(contract.DATASET_PATH_TAG)
    if fingerprint is None:
        if tagged and Path(tagged).is_dir():
            return tagged
        return _prepare(data_config)
    return dataset(fingerprint, data_config, tagged, what=f"the data of MLflow run {run.info.run_id}")


def dataset(fingerprint: str, data_config=None, tagged: str | None = None, what: str | None = None) -> str:
    """The prepared data of `fingerprint` as a local folder, wherever this host is: `tagged` when it
    holds it here; a copy fetched earlier; the store's copy (fetched, its fingerprint verified); else
    `data_config` prepared here when that gives the same fingerprint. StoreFileError in one line
    when none of them has it. A torchrun node's or Dask worker's way to the data without a shared disk."""
    candidates = [Path(tagged)] if tagged else []
    cache = settings.ddpm_home(create=True) / "cache" / "datasets" / fingerprint[:32]
    candidates.append(cache)
    for folder in candidates:
        if _holds(folder, fingerprint):
            return str(folder)
    problem = "no copy in the tracking store (trained with a local store, or publishing off)"
    if found := _dataset_runs(fingerprint):
        try:
            return str(_fetch_dataset(found[0].info.run_id, cache, fingerprint))
        except (StoreFileError, DataError) as error:
            problem = one_line(error)
    if data_config is not None:
        try:
            prepared = _prepare(data_config)
        except DataError as error:
            prepared, problem = None, f"{problem}; preparing its source here: {one_line(error)}"
        if prepared and _holds(Path(prepared), fingerprint):
            return prepared
        if prepared:
            problem += f"; its source prepared here is another version ({read_manifest(Path(prepared))['fingerprint'][:12]})"
    raise StoreFileError(f"{what or 'the prepared data'} (fingerprint {fingerprint[:12]}) is not on this host: {problem}")


def _holds(folder: Path, fingerprint: str) -> bool:
    try:
        return read_manifest(folder).get("fingerprint") == fingerprint and (folder / "data.npz").is_file()
    except DataError:
        return False


def _prepare(data_config) -> str:
    from tasks.data import prepare_data

    home = settings.ddpm_home()
    return prepare_data.with_options(result_storage=home / "task-results")(data_config, out_dir=str(home / "data"))


def _fetch_dataset(dataset_run_id: str, folder: Path, fingerprint: str) -> Path:
    def download(tmp: str) -> Path:
        mlflow.artifacts.download_artifacts(run_id=dataset_run_id, artifact_path=contract.DATASET_ARTIFACT_DIR,
                                            dst_path=tmp, tracking_uri=settings.tracking_uri())
        return Path(tmp) / contract.DATASET_ARTIFACT_DIR

    def verify(fetched: Path) -> None:
        dataset = load_prepared(fetched)   # recomputes the fingerprint: the data's checksum
        if dataset.fingerprint != fingerprint:
            raise DataError(f"the store's copy holds fingerprint {dataset.fingerprint[:12]}")

    def install(fetched: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(fetched, folder)
        return folder

    # fetched beside `folder` (it replaces that folder whole)
    return _fetch_verified(f"the prepared data {fingerprint[:12]}", folder.parent,
                           _artifact_size(dataset_run_id, f"{contract.DATASET_ARTIFACT_DIR}/data.npz"),
                           download, verify, install)


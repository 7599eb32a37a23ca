"""Prefect task that prepares a dataset once and caches it across runs; MLflow dataset logging.

Cache key: sha256 of (the config's JSON, the source identity, out_dir, download_dir). The
source identity (ddpm.data.source_identity) changes when a source file changes (its md5 where
one is expected, else name + size + mtime; the sklearn version for digits), so a changed file or
config re-prepares and a repeat does no work. Before a cached result is used, the key function
checks that the prepared folder it points to is still there (manifest and data file); if not,
it drops that cache record so the task runs again instead of returning a dangling path.

Results are persisted under $DDPM_HOME/task-results (resolved when this module is imported);
override per call with prepare_data.with_options(result_storage=Path).
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path

import numpy as np
from prefect import task
from prefect.context import TaskRunContext

from ddpm.data import (DataConfig, DataError, PreparedDataset, dataset_version, prepare_dataset, prepared_path,
                       read_manifest, source_identity)
from ddpm.data.prepare import DATA_FILE, default_download_dir
from tasks.contract import DATASET_CLASS_NAMES_TAG, DATASET_SKIPPED_FILES_TAG
from tasks.settings import ddpm_home

RESULTS_DIR = ddpm_home() / "task-results"
_LOG_INPUT_LOCK = threading.Lock()

# what every MLflow tag store holds (8000 since MLflow 2.x; 5000 before, and on older servers)
MAX_TAG_CHARS = 5000


def _arguments(parameters: dict) -> tuple[DataConfig, Path, Path | None]:
    config = parameters["config"]
    if not isinstance(config, DataConfig):
        config = DataConfig.model_validate(config)
    download_dir = parameters.get("download_dir")
    return config, Path(parameters["out_dir"]).resolve(), Path(download_dir).resolve() if download_dir else None


def _is_prepared(path: Path) -> bool:
    """Cheap check that a prepared folder is still complete (the full check is load_prepared)."""
    try:
        return "fingerprint" in read_manifest(path) and (path / DATA_FILE).is_file()
    except DataError:
        return False


def prepare_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Key on (config, source identity, out_dir, download_dir); forget a record whose output is gone.
    The source is listed once (its identity serves the key and the prepared folder's path)."""
    config, out_dir, download_dir = _arguments(parameters)
    identity = source_identity(config.source, download_dir or default_download_dir(out_dir))
    payload = json.dumps({"config": config.model_dump(mode="json"), "identity": identity,
                          "out_dir": str(out_dir), "download_dir": str(download_dir)}, sort_keys=True)
    key = "prepare-data-" + hashlib.sha256(payload.encode()).hexdigest()
    if not _is_prepared(prepared_path(config, out_dir, download_dir, identity=identity)):
        storage = getattr(context.task, "result_storage", None)
        if isinstance(storage, (str, Path)):   # a record pointing at a deleted folder: drop it
            (Path(storage).expanduser().resolve() / key).unlink(missing_ok=True)
    return key


@task(cache_key_fn=prepare_cache_key, cache_expiration=None, result_storage=RESULTS_DIR,
      persist_result=True, retries=0)
def prepare_data(config: DataConfig, out_dir: str, download_dir: str | None = None) -> str:
    """Prepare `config`'s dataset under out_dir (see ddpm.data.prepare_dataset); returns its folder."""
    return str(prepare_dataset(config, Path(out_dir), download_dir=Path(download_dir) if download_dir else None))


def log_dataset_input(run_id: str, dataset: PreparedDataset, context: str = "training") -> None:
    """Log the dataset as an input of MLflow run `run_id`, identified by its fingerprint.

    The run is addressed by id (MLflow's fluent `start_run` would end it, marking a run that is
    still training FINISHED). The MLflow dataset's digest is the first 32 hex digits of the
    fingerprint (MLflow's digest column is short); the full fingerprint goes in the tag
    `dataset.fingerprint`. Its version in its lineage (ddpm.data.dataset_version), when its history
    lists it, goes in the run tags `dataset.version`, `dataset.previous_fingerprint` ("none" for
    the first), `dataset.added`, `dataset.removed` and `dataset.moved_to_holdout` ("unknown" when the
    previous folder was gone), and in the dataset input's tags of the same names without `dataset.`.
    Its class names (labels are positions in them) go in `dataset.class_names` (class_names_tag),
    so that retraining compares classes by name; the count of source files preparation skipped
    (unreadable images) in `dataset.skipped_files`.
    """
    import mlflow
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    from tasks import contract, tracking

    manifest = dataset.manifest
    name = f"{manifest['source']}-{manifest['image_size']}x{manifest['image_size']}x{manifest['channels']}"
    train = dataset.train_indices.numpy()
    images = dataset.images.numpy()
    # MLflow keeps the features' shape, size, bytes and dtype (the digest is the fingerprint's), never
    # their values: a zero-stride view of the train split's shape, not a copy of the split
    features = np.broadcast_to(images[:1], (len(train), *images.shape[1:]))
    with warnings.catch_warnings():   # MLflow registers its local source type twice and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        mlflow_dataset = mlflow.data.from_numpy(
            features=features,
            targets=dataset.labels.numpy()[train] if dataset.labels is not None else None,
            source=str(Path(dataset.path).resolve()),
            name=name,
            digest=dataset.fingerprint[:32],
        )
    version_tags = _version_tags(dataset, contract)
    tags = {"mlflow.data.context": context, "fingerprint": dataset.fingerprint, "split": "train",
            **{key.removeprefix("dataset."): value for key, value in version_tags.items()}}
    inputs = [DatasetInput(mlflow_dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])]
    client = tracking.client()
    # MLflow creates the dataset row on first use with a get-or-create that is not atomic: two
    # runs of one experiment logging the same dataset at once (compare_schedules in parallel)
    # collide on its unique key. Serialise within the process; retry once across processes,
    # when the row the other writer created is found.
    with _LOG_INPUT_LOCK:
        try:
            client.log_inputs(run_id, datasets=inputs)
        except mlflow.exceptions.MlflowException as error:
            if "UNIQUE constraint failed" not in str(error):
                raise
            client.log_inputs(run_id, datasets=inputs)
    for key, value in {contract.DATASET_FINGERPRINT_TAG: dataset.fingerprint, contract.DATASET_NAME_TAG: name,
                       contract.DATASET_PATH_TAG: str(dataset.path),
                       contract.DATASET_TRAIN_COUNT_TAG: str(manifest["splits"]["train"]),
                       contract.DATASET_HOLDOUT_COUNT_TAG: str(manifest["splits"]["holdout"]),
                       DATASET_CLASS_NAMES_TAG: class_names_tag(manifest.get("class_names")),
                       DATASET_SKIPPED_FILES_TAG: str(len(manifest.get("skipped_files") or [])),
                       **version_tags}.items():
        client.set_tag(run_id, key, value)


def _version_tags(dataset: PreparedDataset, contract) -> dict[str, str]:
    """The dataset's version as run tags ({} when no lineage history lists its folder, or when its
    history cannot be read: the version is information, not a reason to fail a training)."""
    try:
        version = dataset_version(dataset)
    except DataError as error:
        warnings.warn(f"dataset version not logged: {error}", stacklevel=2)
        return {}
    if version is None:
        return {}

    def count(value):
        return "unknown" if value is None else str(value)

    return {contract.DATASET_VERSION_TAG: str(version["number"]),
            contract.DATASET_PREVIOUS_FINGERPRINT_TAG: version["previous"] or "none",
            contract.DATASET_ADDED_TAG: count(version["added"]),
            contract.DATASET_REMOVED_TAG: count(version["removed"]),
            contract.DATASET_MOVED_TO_HOLDOUT_TAG: count(version["moved_to_holdout"])}


def class_names_tag(names: list[str] | None) -> str:
    """The tag value of a dataset's class names: their JSON list ("null": no labels), or, when that
    is longer than a tag holds, {"count", "sha256"} of it (tagged_class_names reads either)."""
    text = json.dumps(names)
    if len(text) <= MAX_TAG_CHARS:
        return text
    return json.dumps({"count": len(names), "sha256": hashlib.sha256(text.encode()).hexdigest()})


def tagged_class_names(tags: dict[str, str]) -> list[str] | dict | None:
    """The class names a run's tags record (class_names_tag): a list, None for unlabelled data, or
    {"count", "sha256"} for a long list; LookupError when the run has no such tag (older runs)."""
    if DATASET_CLASS_NAMES_TAG not in tags:
        raise LookupError(f"no {DATASET_CLASS_NAMES_TAG} tag")
    return json.loads(tags[DATASET_CLASS_NAMES_TAG])

"""MLflow bookkeeping shared by the tasks: the store, experiments, runs, batched metrics, pictures.

Tasks address runs by id through an MlflowClient instead of MLflow's thread-local "active run",
so they work the same in the flow's thread, in a task-runner thread, or in another process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import traceback
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from prefect.exceptions import TerminationSignal

from tasks import contract
from tasks.settings import artifact_root, ddpm_home, is_tracking_server, redact, tracking_uri


_INITIALISED_STORES: set[str] = set()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` shared by every process of this machine (fcntl)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def store_lock(name: str):
    """`file_lock` shared by every process using this DDPM_HOME."""
    return file_lock(ddpm_home(create=True) / "locks" / f"{name}.lock")


def _has_tables(database: Path) -> bool:
    """Whether the sqlite file holds MLflow's tables already, read without writing anything."""
    import sqlite3

    if not database.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
                                      ).fetchone() is not None
    except sqlite3.Error:
        return False


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _INITIALISED_STORES or not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    # MLflow builds a new sqlite store's tables when the first client opens it, without a lock:
    # two processes doing it at once crash one of them ("table ... already exists"). Serialise it.
    database = Path(uri.removeprefix("sqlite:///"))
    if _has_tables(database):   # an existing store: nothing to create, so no lock file (a read-only store stays readable)
        _INITIALISED_STORES.add(uri)
        return MlflowClient(uri)
    # MLflow announces a new store's tables at INFO on stderr, where a command's only line should be its own
    creation_logger = logging.getLogger("mlflow.store.db.utils")
    level = creation_logger.level
    creation_logger.setLevel(logging.WARNING)
    try:
        with file_lock(database.with_name(database.name + ".init-lock")):
            mlflow_client = MlflowClient(uri)
            mlflow_client.search_experiments(max_results=1)
    finally:
        creation_logger.setLevel(level)
    _INITIALISED_STORES.add(uri)
    return mlflow_client


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment, or of one of its runs, at `base` (the UI's or the
    tracking server's http address), opening in the model-training view."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{page}/runs/{run_id}?{contract.UI_TRAINING_VIEW}" if run_id else f"{page}?{contract.UI_TRAINING_VIEW}"


def check_experiment_name(name: str) -> str:
    """`name`, or a ValueError in one line when it could not be an experiment's name here: on a
    local store the name is a folder under $DDPM_HOME/mlartifacts, so a '/', '\\', '.', '..' or a
    control character would put a run's files elsewhere (`../../x` outside DDPM_HOME)."""
    bad = [c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if not name.strip() or name.strip() in (".", "..") or bad or name != name.strip():
        shown = repr(name)
        why = (f"it contains {', '.join(sorted(set(map(repr, bad))))}" if bad else
               "it is empty, '.' or '..', or starts or ends with a space")
        raise ValueError(f"experiment name {shown} is refused: {why}; use letters, digits, spaces and "
                         "'-_.:' (e.g. 'team-digits')")
    return name


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if it is new, and marked as a model-training experiment
    for the MLflow UI. A new experiment's artifacts go where the store says: on a tracking server,
    its default artifact location (proxied mlflow-artifacts:, S3, ...), which every host reaches;
    on a local store, $DDPM_HOME/mlartifacts/<name> (MLflow's default would be ./mlruns of
    whatever folder the process started in)."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        check_experiment_name(name)   # before anything is written under that name
    if experiment is not None:
        if contract.EXPERIMENT_KIND_TAG not in experiment.tags:   # made by an older version, or by hand
            mlflow_client.set_experiment_tag(experiment.experiment_id, contract.EXPERIMENT_KIND_TAG,
                                             contract.EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        location = None if is_tracking_server(tracking_uri()) else f"{artifact_root()}/{name}"
        return mlflow_client.create_experiment(name, artifact_location=location,
                                               tags={contract.EXPERIMENT_KIND_TAG: contract.EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return mlflow_client.get_experiment_by_name(name).experiment_id


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 2e-4}} -> {"train.lr": "0.0002"}: MLflow params are flat strings."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class MetricBuffer:
    """Collects metrics and sends them to MLflow in batches (one log_batch per `flush_every` logs):
    a log_metric call costs ~14 ms on sqlite, more than a small training step.

    With psutil installed (and `system_metrics`), each log also records the machine's CPU use
    (`system.cpu_percent`, since the previous log) and this process's resident memory
    (`system.process_rss_mb`): two cheap reads, no extra thread. `seconds` is the time spent
    here, so callers can report logging's share of training time; `batches` counts log_batch calls.
    """

    def __init__(self, run_id: str, flush_every: int = 10, system_metrics: bool = True, skip_through: int = -1):
        self.run_id, self.flush_every = run_id, flush_every
        self.skip_through = skip_through   # steps already logged (before a crash): not logged twice
        self.pending: list[Metric] = []
        self.calls = 0
        self.batches = 0
        self.seconds = 0.0
        self._process = _psutil_process() if system_metrics else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.skip_through:
            return
        start = time.perf_counter()
        if self._process is not None:
            import psutil

            metrics = {**metrics, "system.cpu_percent": psutil.cpu_percent(interval=None),
                       "system.process_rss_mb": self._process.memory_info().rss / 2**20}
        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        self.calls += 1
        self.seconds += time.perf_counter() - start
        if self.calls % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start = time.perf_counter()
        mlflow_client = client()
        for i in range(0, len(self.pending), 1000):  # MLflow accepts at most 1000 metrics a batch
            mlflow_client.log_batch(self.run_id, metrics=self.pending[i : i + 1000], synchronous=True)
            self.batches += 1
        self.pending = []
        self.seconds += time.perf_counter() - start


def _psutil_process():
    """This process as a psutil.Process, primed for cpu_percent; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    psutil.cpu_percent(interval=None)  # the first call only starts the measurement window
    return psutil.Process()


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_file(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2, default=str))
        client().log_artifact(run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)


class RunNotFoundError(LookupError):
    """No MLflow run matches the id (or Prefect flow-run id) asked for."""


def parse_flow_run_id(value: str) -> str:
    """"prefect.flow-run.<uuid>" (an event's resource id, as a trigger passes it) or "<uuid>" -> "<uuid>"."""
    value = value.strip()
    return value.removeprefix("prefect.flow-run.")


def find_run(mlflow_run_id: str | None = None, prefect_flow_run_id: str | None = None) -> mlflow.entities.Run:
    """The MLflow run with this id, or the one tagged `prefect.flow_run_id` = this Prefect flow run."""
    mlflow_client = client()
    if mlflow_run_id:
        try:
            return mlflow_client.get_run(mlflow_run_id)
        except mlflow.exceptions.MlflowException as error:
            raise RunNotFoundError(f"no MLflow run with id '{mlflow_run_id}' in {redact(tracking_uri())}") from error
    if not prefect_flow_run_id:
        raise ValueError("give an MLflow run id or a Prefect flow-run id")
    flow_run_id = parse_flow_run_id(prefect_flow_run_id)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    runs = mlflow_client.search_runs(experiments, filter_string=f"tags.`{contract.FLOW_RUN_TAG}` = '{flow_run_id}'",
                                     order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise RunNotFoundError(f"no MLflow run is tagged with Prefect flow run '{flow_run_id}' in {redact(tracking_uri())}")
    return runs[0]


def run_config(run: mlflow.entities.Run) -> dict:
    """The configuration train_pipeline logged as config.json in `run`."""
    try:
        return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{contract.CONFIG_ARTIFACT}")
    except Exception as error:  # noqa: BLE001 (MLflow raises several types for a missing artifact)
        raise FileNotFoundError(
            f"MLflow run {run.info.run_id} has no {contract.CONFIG_ARTIFACT}: it was not made by train_pipeline"
        ) from error


# --- the run lifecycle ------------------------------------------------------------------------
# A run is RUNNING while its process works on it, FINISHED only when the flow completed, FAILED
# (or KILLED on Ctrl-C) when it raised. A process killed outright (kill -9, OOM, reboot) cannot
# say so: its run keeps RUNNING, so every run records the host and pid working on it, and
# `mark_vanished_runs` fails the runs whose process is gone when an experiment is next used.

def _process_tags() -> dict[str, str]:
    return {contract.HOST_TAG: socket.gethostname(), contract.PID_TAG: str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def vanished(run: mlflow.entities.Run) -> bool:
    """A RUNNING run whose recorded process on this host no longer exists."""
    tags = run.data.tags
    if (run.info.status != "RUNNING" or tags.get(contract.HOST_TAG) != socket.gethostname()
            or not tags.get(contract.PID_TAG)):
        return False
    pid = int(tags[contract.PID_TAG])
    return pid != os.getpid() and not _process_alive(pid)


def mark_vanished_runs(experiment: str) -> list[str]:
    """Fail the RUNNING runs of `experiment` whose process on this host is gone; their ids."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    marked = []
    for run in mlflow_client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if vanished(run):
            run_id = run.info.run_id
            mlflow_client.set_tag(run_id, contract.ERROR_TAG, f"the process training it (pid {run.data.tags[contract.PID_TAG]}) "
                                                   f"ended without finishing it; `ddpm train --resume {run_id}` "
                                                   "continues it")
            mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            marked.append(run_id)
    return marked


def create_run(experiment: str, run_name: str | None, params: dict, tags: dict | None = None) -> str:
    """A new RUNNING run of `experiment` with flattened `params` and `tags`; its id."""
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(experiment), run_name=run_name, tags={**(tags or {}), **_process_tags()})
    items = list(flatten_params(params).items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        mlflow_client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def reopen_run(run_id: str, force: bool = False) -> mlflow.entities.Run:
    """Set an unfinished run RUNNING again, owned by this process (to resume it); the run as it was.

    Refused for a run that FINISHED, and for one still RUNNING in a live process (on this host),
    or on another host (which cannot be asked), unless `force` declares it dead: recorded as the
    tag `resume.forced`. The check and the taking over are one step under a lock, so of two
    resumes of one run at the same instant on this machine only one proceeds.
    """
    mlflow_client = client()
    with store_lock(f"resume-{run_id}"):
        run = find_run(run_id)
        if run.info.status == "FINISHED":
            raise ValueError(f"MLflow run {run_id} is FINISHED: nothing to resume")
        tags = run.data.tags
        owner = f"process {tags.get(contract.PID_TAG)} on {tags.get(contract.HOST_TAG)}"
        alive = run.info.status == "RUNNING" and not vanished(run) and tags.get(contract.PID_TAG) != str(os.getpid())
        if alive and tags.get(contract.HOST_TAG) == socket.gethostname():
            # --force declares dead an owner that cannot be seen; this one can, and lives: two trainers
            # would share the run and its checkpoint folder
            raise ValueError(f"MLflow run {run_id} is still RUNNING in {owner}, alive on this host: stop it "
                             f"first (kill {tags.get(contract.PID_TAG)}); --force only declares dead an owner on "
                             "another host that cannot be asked")
        if alive and not force:
            raise ValueError(f"MLflow run {run_id} is still RUNNING in {owner}; stop it first, or, if that process "
                             "is gone (a preempted node, a reboot), declare it dead: `ddpm train --resume "
                             f"{run_id} --force`")
        mlflow_client.update_run(run_id, status="RUNNING")
        for key, value in _process_tags().items():
            mlflow_client.set_tag(run_id, key, value)
        if alive:
            mlflow_client.set_tag(run_id, contract.RESUME_FORCED_TAG,
                                  f"declared dead at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: was "
                                  f"RUNNING in {owner}")
    mlflow_client.set_tag(run_id, contract.RESUMED_TAG, str(int(tags.get(contract.RESUMED_TAG, "0")) + 1))
    return run


@contextmanager
def run_lifecycle(run_id: str) -> Iterator[str]:
    """FINISHED when the block completes; FAILED (KILLED on Ctrl-C or SIGTERM) with an `error` tag
    when it raises."""
    mlflow_client = client()
    try:
        yield run_id
    except BaseException as error:
        # Ctrl-C, or SIGTERM (Prefect turns it into TerminationSignal inside a flow run)
        status = RunStatus.KILLED if isinstance(error, (KeyboardInterrupt, TerminationSignal)) else RunStatus.FAILED
        try:
            mlflow_client.set_tag(run_id, contract.ERROR_TAG, traceback.format_exc(limit=3)[-4000:])
            mlflow_client.set_terminated(run_id, RunStatus.to_string(status))
        except Exception:  # noqa: BLE001 (the store itself failing must not hide the first error)
            pass
        raise
    # a resumed run that finishes is no longer failed: an earlier attempt's error moves to a history tag
    error = mlflow_client.get_run(run_id).data.tags.get(contract.ERROR_TAG)
    if error is not None:
        mlflow_client.set_tag(run_id, contract.PREVIOUS_ERROR_TAG, error)
        mlflow_client.delete_tag(run_id, contract.ERROR_TAG)
    mlflow_client.set_terminated(run_id)

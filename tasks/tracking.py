"""MLflow bookkeeping shared by the tasks: the store, experiments, runs, batched metrics, pictures.

Tasks address runs by id through an MlflowClient instead of MLflow's thread-local "active run",
so they work the same in the flow's thread, in a task-runner thread, or in another process.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tasks.settings import artifact_root, tracking_uri


def client() -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created with an explicit artifact location if it is new."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=f"{artifact_root()}/{name}")
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

    def __init__(self, run_id: str, flush_every: int = 10, system_metrics: bool = True):
        self.run_id, self.flush_every = run_id, flush_every
        self.pending: list[Metric] = []
        self.calls = 0
        self.batches = 0
        self.seconds = 0.0
        self._process = _psutil_process() if system_metrics else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
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
            raise RunNotFoundError(f"no MLflow run with id '{mlflow_run_id}' in {tracking_uri()}") from error
    if not prefect_flow_run_id:
        raise ValueError("give an MLflow run id or a Prefect flow-run id")
    flow_run_id = parse_flow_run_id(prefect_flow_run_id)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    runs = mlflow_client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                                     order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise RunNotFoundError(f"no MLflow run is tagged with Prefect flow run '{flow_run_id}' in {tracking_uri()}")
    return runs[0]

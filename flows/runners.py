"""Where a flow's fanned-out tasks run: threads in the flow's process, a temporary local Dask
cluster, or an existing Dask scheduler (compare_schedules' pipelines, evaluate's post-hoc EMA
widths). A subflow called with `.with_options(task_runner=fan_out_runner(...))` runs its
submitted tasks there."""

from __future__ import annotations

from typing import Annotated

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from tasks import settings

# Where fanned-out tasks run: None (threads here), "local" or a Dask scheduler address.
DaskCluster = Annotated[str | None, Field(pattern=r"^(local|(tcp|tls|inproc|ucx)://\S+)$",
                                          description="None: threads in the flow's process; 'local': a "
                                                      "temporary Dask cluster of max_parallel processes; "
                                                      "'tcp://host:8786': that Dask scheduler")]


def fan_out_runner(dask_cluster: str | None, max_parallel: int) -> TaskRunner:
    """The task runner for `dask_cluster` (see DaskCluster). Dask needs prefect-dask (the `dask` extra):
    without it, an ImportError that says so."""
    if dask_cluster is None:
        return ThreadPoolTaskRunner(max_workers=max_parallel)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise settings.MissingExtraError(f"dask_cluster={dask_cluster!r} needs prefect-dask, which is not installed: "
                                         "pip install 'ddpm-pipeline[dask]'") from None
    if dask_cluster == "local":   # one single-threaded worker process per pipeline (Dask sets OMP_NUM_THREADS=1)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max_parallel, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    check_scheduler(dask_cluster)
    return DaskTaskRunner(address=dask_cluster)


def check_scheduler(address: str, timeout_seconds: float = 10.0) -> None:
    """A ValueError, before any run exists, when the Dask scheduler at `address` does not answer."""
    from distributed import Client

    try:
        Client(address, timeout=timeout_seconds).close()
    except OSError as error:   # distributed's connection timeouts are OSErrors
        raise ValueError(f"the Dask scheduler at {address} did not answer within {timeout_seconds:g} s: "
                         f"{error}") from None

"""The temporary Prefect server a command runs its flows against when no server is configured.

Prefect starts its own temporary server (`SubprocessASGIServer`) with a plain Popen and stops it
from an exit handler, so a `ddpm` process killed with SIGKILL (the OOM killer, a preempted node)
leaves that server running, ~200 MB each. This starts the same app (uvicorn serving
`prefect.server.api.server:create_app`, UI off, as Prefect does) with a parent-death signal: the
kernel stops it when its parent dies, however it dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from ddpm.torchrun import parent_death_signal


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _drain_prefect_workers(timeout: float = 10) -> None:
    """Send the logs and events Prefect still buffers while the server is up: at exit they would
    retry against a stopped server for a minute and end in "Error logging to API"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL the flows run in this context use: $PREFECT_API_URL (a stack or a
    remote server) as is, else a temporary server bound to this process. Child processes (Dask
    workers, torchrun) inherit the URL and share that one server. The signal is tied to the calling
    thread: enter this from the thread that outlives the flows (the main thread)."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  get_current_settings, temporary_settings)

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
    previous_url = os.environ.get("PREFECT_API_URL")
    server = None
    try:
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        for _ in range(3):   # the free port can be taken between probing it and the server binding it
            port = _free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=environment, stdin=subprocess.DEVNULL, preexec_fn=parent_death_signal(os.getpid()))
            while server.poll() is None and not _healthy(api_url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the temporary Prefect server did not answer on port {port} within "
                                       f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s")
                time.sleep(0.25)
            if server.poll() is None:
                break
        else:
            raise OSError(f"the temporary Prefect server exited with status {server.returncode} before "
                          f"answering (three ports tried)")
        os.environ["PREFECT_API_URL"] = api_url
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        try:
            _drain_prefect_workers()
        finally:
            if previous_url is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous_url
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()

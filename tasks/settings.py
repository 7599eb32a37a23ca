"""Where the pipeline keeps its files, and the environment every process of it runs with.

    DDPM_HOME (default ./.ddpm)        prepared data, checkpoints, samples, caches
    MLFLOW_TRACKING_URI (default sqlite:///$DDPM_HOME/mlflow.db, absolute)
    artifacts of new experiments        $DDPM_HOME/mlartifacts on a local store; the server's own
                                        artifact store on a tracking server (http, https)
"""

from __future__ import annotations

import os
from pathlib import Path

# Prefect and MLflow phone home unless told not to; offline that is only noise and delay.
OFFLINE_ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",  # MLflow honours "true" only
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # a fresh database needs ~17 s here
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class MissingExtraError(ImportError):
    """An optional extra of the project that a setting needs is not installed (the message says
    which and how to install it)."""


def apply_offline_environment() -> None:
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def ddpm_home(create: bool = False) -> Path:
    home = Path(os.environ.get("DDPM_HOME", ".ddpm")).expanduser().resolve()
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """The MLflow store: $MLFLOW_TRACKING_URI, else an sqlite file in DDPM_HOME (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ddpm_home(create=True) / 'mlflow.db'}"


def redact(uri: str) -> str:
    """`uri` as it may be printed, logged or tagged: a password in it (postgresql://user:secret@db,
    https://user:token@mlflow) shown as ***; credentials never reach a log line."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def is_tracking_server(uri: str) -> bool:
    """An MLflow tracking server (every host reaches it, and its artifact store) rather than a store
    this process opens itself (sqlite, a database URL, files)."""
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_root() -> str:
    return (ddpm_home() / "mlartifacts").as_uri()


def metrics_cache_dir() -> Path:
    """Where scoring keeps what it builds once per dataset (classifier, reference statistics, floors)."""
    path = ddpm_home(create=True) / "cache" / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(run_id: str) -> Path:
    """Checkpoints and samples of one MLflow run."""
    path = ddpm_home() / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


class ServerUnreachable(ConnectionError):
    """Nothing answers at a server's address (a stack not started, a wrong URL, a closed port)."""


def check_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """ServerUnreachable, one line naming `what` and the address, when an http(s) `url`'s host and
    port take no connection within `timeout` seconds; other URLs (sqlite, files) pass."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ServerUnreachable(f"{what} at {redact(url)} is unreachable ({reason}): start it (scripts/stack.sh start) or "
                                "point the variable at one that runs") from None

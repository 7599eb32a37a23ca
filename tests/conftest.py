"""Shared test fixtures. Every test process runs offline and without telemetry."""
import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# Nothing a test writes may land in the user's ./.ddpm or ~/.prefect: point both at a temp dir
# before any project module reads them.
os.environ["DDPM_HOME"] = tempfile.mkdtemp(prefix="ddpm-test-home-")
# ... and the temporary Prefect servers of CLI processes get their own database (one per test
# process: pytest-xdist workers never share an sqlite file)
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ddpm-test-prefect-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's training-heavy tests: on 2 cores shared with other
    jobs, 2 threads trained several times slower (measured). The old count is restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server and database for the whole session (~20 s to start).

    PREFECT_HOME points into a temp dir so nothing touches the user's ~/.prefect.
    """
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow sqlite store and DDPM_HOME in tmp_path for one test; returns the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    return uri


# Fixtures that cost 20 s or more (a Prefect server, a trained FID classifier): their tests are
# `slow` without each saying so. The others are marked where they stand.
SLOW_FIXTURES = {"prefect_harness", "digits_model", "mnist_model"}


def pytest_collection_modifyitems(config, items):
    """`pytest -m "not slow"` runs the unit tests alone, in about a minute."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

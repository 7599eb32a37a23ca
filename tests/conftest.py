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
os.environ.pop("MLFLOW_REGISTRY_URI", None)   # the registry follows the tracking store

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


# The tiers. Fast (a plain `python -m pytest`, a few minutes on 2 cores): unit and component
# tests, no servers, no subprocess trainings. Slow (`DDPM_SLOW_TESTS=1`, as the README's test
# command and .ci/run set it; or any explicit `-m`): real Prefect servers and workers, CLI
# processes, trainings, the Inception network, killed processes. A test is slow when it says so
# (`@pytest.mark.slow`, or `pytestmark` for a module): one way to declare it.
RUN_SLOW = os.environ.get("DDPM_SLOW_TESTS", "") not in ("", "0")

# Fixtures that cost 20 s or more (a Prefect server, a trained FID classifier): a test using one
# must be marked slow itself, or collection stops naming it.
SLOW_FIXTURES = {"prefect_harness", "digits_model", "mnist_model"}


def pytest_report_header(config):
    if not (RUN_SLOW or config.option.markexpr):
        return "fast tier only: DDPM_SLOW_TESTS=1 also runs the slow one (servers, trainings, Inception)"
    return None


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"these tests use a slow fixture ({', '.join(sorted(SLOW_FIXTURES))}) without "
                                f"@pytest.mark.slow: {', '.join(unmarked)}")
    if RUN_SLOW or config.option.markexpr:   # an explicit -m chooses for itself
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]

"""The served model: `mlflow models serve` on the champion (a real server on loopback, real HTTP
requests), and how the model is stored: logged as code (tasks/served_model.py), loadable where
another `tasks` package wins the import, and versions pickled before that still loading."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from trained_runs import fake_trained_run, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
# a version logged before models-from-code (made by tests/data/make_legacy_model.py)
LEGACY_MODEL = Path(__file__).resolve().parent / "data" / "legacy-model-tasks-serving"
MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_served_champion_returns_png_images_and_400_for_bad_requests(tmp_path, monkeypatch):
    from tasks.registry import promote_best

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    fake_trained_run(MlflowClient(uri), "ddpm", checkpoint, 3.0)
    promote_best("ddpm", "ddpm", max_images=4)

    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    # the project importable as if installed (PYTHONPATH), the server started from elsewhere;
    # the CLI execs `uvicorn` by name, so the venv's bin must be on PATH (as in an activated venv)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(MLFLOW), "models", "serve", "-m", "models:/ddpm@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            log.seek(0)
            assert server.poll() is None, f"server exited:\n{log.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping within 120 s:\n{log.read()[-3000:]}"
            time.sleep(1)

        status, body = post(f"{base}/invocations", {
            "dataframe_records": [{"num_images": 2}],
            "params": {"seed": 1, "sampler": "ddim", "steps": 5, "format": "png_base64"}})
        assert status == 200, body
        images = [np.array(Image.open(io.BytesIO(base64.b64decode(png)))) for png in body["predictions"]]
        assert [(image.shape, image.dtype) for image in images] == [((16, 16), np.uint8)] * 2

        status, body = post(f"{base}/invocations", {"dataframe_records": [{"num_images": 1}],
                                                    "params": {"sampler": "ddim", "steps": 5, "seed": 1}})
        assert status == 200 and np.array(body["predictions"]).shape == (1, 1, 16, 16)
        assert np.array_equal(np.array(body["predictions"])[0, 0], images[0])  # same seed, same image

        for payload, message in [
            ({"dataframe_records": [{"num_images": 5}]}, "'num_images' must be between 1 and 4"),
            ({"dataframe_records": [{"num_images": 1}], "params": {"steps": 1000}}, "'steps' must be between 1 and 100"),
            ({"dataframe_records": [{"num_images": "two"}]}, "num_images"),
            # MLflow would cast these to the integer 2, 1 and 3 under a declared integer column
            ({"dataframe_records": [{"num_images": 2.5}]}, "'num_images' must be an integer, got 2.5"),
            ({"dataframe_records": [{"num_images": True}]}, "'num_images' must be an integer, got True"),
            ({"dataframe_records": [{"num_images": "3"}]}, "'num_images' must be an integer, got '3'"),
            ({"dataframe_records": [{"num_images": 1}], "params": {"steps": "five"}}, "steps"),
        ]:
            status, body = post(f"{base}/invocations", payload)
            assert status == 400 and message in body["message"], (payload, status, body)
            assert body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI parent and its uvicorn child
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_model_pickled_before_models_from_code_still_unpickles():
    """Versions logged before models-from-code pickle their PythonModel class by reference:
    tasks.serving.DDPMImageModel, or tasks.registry.DDPMImageModel for those registered before
    tasks.serving existed. Both names still lead to the class, and the bounds pickled in the
    instance's state survive."""
    import pickle

    import cloudpickle

    from tasks.served_model import DDPMImageModel

    model = DDPMImageModel()
    model.max_images = 7
    new = pickle.dumps(model, protocol=0)
    assert b"tasks.served_model" in new
    for legacy in (b"tasks.serving", b"tasks.registry"):
        old = pickle.loads(new.replace(b"tasks.served_model", legacy))
        assert type(old) is DDPMImageModel and old.max_images == 7 and old.max_steps == 1000

    # the committed fixture, pickled by the code before the switch (tests/data/make_legacy_model.py)
    pickled = (LEGACY_MODEL / "python_model.pkl").read_bytes()
    assert b"tasks.serving" in pickled
    old = cloudpickle.loads(pickled)
    assert type(old) is DDPMImageModel and (old.max_images, old.max_steps) == (8, 1000)


@pytest.mark.slow
def test_a_version_registered_before_models_from_code_loads_and_predicts(mlflow_store, tmp_path):
    """The legacy fixture (a cloudpickled tasks.serving.DDPMImageModel), registered as a version,
    loads through the registry with its pickled request bound and draws images."""
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import tracking

    # a copy: loading through the registry writes a registered_model_meta file into the source
    source = shutil.copytree(LEGACY_MODEL, tmp_path / "legacy-model")
    client = tracking.client()  # this store, also for `models:/` URIs (not an earlier test's)
    assert client.tracking_uri == mlflow_store
    client.create_registered_model("legacy")
    version = client.create_model_version("legacy", source=source.as_uri())
    assert str(version.version) == "1"
    model = mlflow.pyfunc.load_model("models:/legacy/1")
    images = model.predict({"num_images": 2}, params={"sampler": "ddim", "steps": 3, "seed": 1})
    assert images.shape == (2, 1, 16, 16) and images.dtype == np.uint8
    assert np.isfinite(images).all()
    with pytest.raises(MlflowException, match="'num_images' must be between 1 and 8"):
        model.predict({"num_images": 9})


@pytest.fixture(scope="module")
def model_logged_now(tmp_path_factory):
    """A model logged and registered by log_ddpm_model today, into a store of its own; the
    MLflow log records and Python warnings emitted while it was logged."""
    import logging
    import warnings

    import mlflow

    from tasks.serving import log_ddpm_model

    tmp = tmp_path_factory.mktemp("logged-now")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    # MLflow's loggers do not propagate to the root logger (where caplog listens)
    mlflow_logger = logging.getLogger("mlflow")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("DDPM_HOME", str(tmp / "home"))
        checkpoint = tiny_checkpoint(tmp / "ckpt")
        run_id = fake_trained_run(MlflowClient(uri), "ddpm", checkpoint, 3.0)
        mlflow_logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = log_ddpm_model(run_id, checkpoint, "ddpm-now", max_images=3, max_steps=20)
        finally:
            mlflow_logger.removeHandler(handler)
        # the way versions were logged before: the same capture sees MLflow's CloudPickle warning
        before = len(records)
        mlflow_logger.addHandler(handler)
        try:
            from tasks.served_model import DDPMImageModel

            mlflow.pyfunc.save_model(str(tmp / "pickled"), python_model=DDPMImageModel(),
                                     pip_requirements=["mlflow"])
        finally:
            mlflow_logger.removeHandler(handler)
        control = [r.getMessage() for r in records[before:]]
        yield {"uri": uri, "info": info, "tmp": tmp, "records": [r.getMessage() for r in records[:before]],
               "warnings": [str(w.message) for w in caught], "control": control}


@pytest.mark.slow
def test_logging_the_model_pickles_nothing_and_mlflow_does_not_warn_about_cloudpickle(model_logged_now):
    assert any("CloudPickle" in message for message in model_logged_now["control"])  # the capture works
    messages = model_logged_now["records"] + model_logged_now["warnings"]
    assert messages, "nothing captured at all: the capture is broken"
    assert not [m for m in messages if "CloudPickle" in m or "cloudpickle" in m]
    # nor its hint about integer columns, printed at every model logging of the README's main job
    assert not [m for m in messages if "integer column" in m]


@pytest.mark.slow
def test_the_logged_model_is_its_code_file_which_never_imports_tasks(model_logged_now):
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(model_logged_now["info"].model_uri,
                                                     dst_path=str(model_logged_now["tmp"] / "download")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["config"] == {"max_images": 3, "max_steps": 20, "max_seconds": 50.0}
    assert not list(local.glob("*.pkl"))
    code = (local / Path(flavor["model_code_path"]).name).read_text()
    assert "class DDPMImageModel" in code and "mlflow.models.set_model(" in code
    assert "import tasks" not in code and "from tasks" not in code


@pytest.mark.slow
def test_a_model_logged_now_loads_where_another_tasks_package_wins(model_logged_now, tmp_path):
    """No `tasks` module is needed to load the model: in a fresh process where a foreign `tasks`
    package (one that refuses to be imported) comes first on sys.path, it loads and predicts."""
    foreign = tmp_path / "foreign"
    (foreign / "tasks").mkdir(parents=True)
    (foreign / "tasks" / "__init__.py").write_text(
        'raise ImportError("a foreign package named tasks, not the ddpm pipeline\'s")\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import importlib.util, sys
assert importlib.util.find_spec("tasks").origin == {str(foreign / "tasks" / "__init__.py")!r}
import mlflow
model = mlflow.pyfunc.load_model("models:/ddpm-now/1")
images = model.predict({{"num_images": 2}}, params={{"sampler": "ddim", "steps": 3, "seed": 1}})
assert images.shape == (2, 1, 16, 16) and str(images.dtype) == "uint8", (images.shape, images.dtype)
try:
    model.predict({{"num_images": 4}})
except mlflow.exceptions.MlflowException as error:
    assert "'num_images' must be between 1 and 3" in str(error), error
else:
    raise AssertionError("the model config's max_images was not applied")
assert not [name for name in sys.modules if name == "tasks" or name.startswith("tasks.")]
print("ok")
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": model_logged_now["uri"],
           "PYTHONPATH": os.pathsep.join([str(foreign), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_a_request_that_would_outlast_the_time_limit_is_refused_before_any_work(model_logged_now, monkeypatch):
    """64 images x 1000 DDPM steps was allowed, answered 504 after 60 s by MLflow's server, and kept
    computing: the model times one network evaluation at load and refuses what would not fit."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", model_logged_now["uri"])
    mlflow.set_tracking_uri(model_logged_now["uri"])
    tight = mlflow.pyfunc.load_model("models:/ddpm-now/1", model_config={"max_seconds": 1e-6})
    assert tight.unwrap_python_model().seconds_per_evaluation > 0
    with pytest.raises(MlflowException, match=r"2 images x 5 ddim steps would take about \d+ s here, over this "
                                              r"model's limit of 1e-06 s: not even one step of one image fits") as raised:
        tight.predict({"num_images": 2}, params={"sampler": "ddim", "steps": 5})
    assert "at most 0" not in str(raised.value)   # it advised "at most 0 image(s)"
    inner = tight.unwrap_python_model()
    inner.max_seconds = 3.5 * inner.seconds_per_evaluation   # room for 3 network evaluations
    with pytest.raises(MlflowException, match=r"one image at 5 steps does not fit either: ask for at most 3 steps"):
        tight.predict({"num_images": 2}, params={"sampler": "ddim", "steps": 5})
    default = mlflow.pyfunc.load_model("models:/ddpm-now/1")   # 50 s: a small request is drawn
    assert default.predict({"num_images": 2}, params={"sampler": "ddim", "steps": 5}).shape == (2, 1, 16, 16)

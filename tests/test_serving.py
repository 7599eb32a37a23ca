"""`mlflow models serve` on the champion: a real server on loopback, real HTTP requests."""

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


def test_a_model_pickled_before_the_serving_module_split_still_unpickles():
    """Registered models pickle their PythonModel class by reference; those registered before
    tasks.serving existed name tasks.registry.DDPMImageModel."""
    import pickle

    from tasks.serving import DDPMImageModel

    new = pickle.dumps(DDPMImageModel(max_images=7), protocol=0)
    assert b"tasks.serving" in new
    old = new.replace(b"tasks.serving", b"tasks.registry")
    model = pickle.loads(old)
    assert type(model) is DDPMImageModel and model.max_images == 7

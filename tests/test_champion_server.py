"""`ddpm serve`: the champion served over HTTP (MLflow's scoring protocol), following the alias.

A real server process on loopback and real registered versions of a tiny model: it serves v1,
switches to v2 while a client keeps sending requests (none fails), refuses a v3 whose weights are
NaN (tagged, alias moved back, v2 still serving), and stops cleanly on SIGTERM. Its mistakes
before starting are one line each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from test_cli import assert_one_error_line
from trained_runs import tiny_checkpoint

pytestmark = pytest.mark.slow   # a server process, three registered versions

REPO = Path(__file__).resolve().parents[1]
NAME = "served"
REQUEST = {"dataframe_records": [{"num_images": 2}], "params": {"seed": 3, "sampler": "ddim", "steps": 3}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, payload: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def register(client: MlflowClient, run_id: str, checkpoint: Path) -> str:
    from tasks.serving import log_ddpm_model

    return str(log_ddpm_model(run_id, checkpoint, registered_model_name=NAME, max_images=8).registered_model_version)


def nan_checkpoint(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` with every floating-point weight NaN (raw and EMA): a model that draws NaN."""
    from ddpm.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    for key in ("model", "ema"):
        state[key] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state[key].items()}
    return save_checkpoint(state, out, int(state["step"]))


def wait_for(condition, what: str, timeout: float, server=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if server is not None:
            assert server.poll() is None, f"server exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n" + (log.read_text()[-3000:] if log else "")
        time.sleep(0.2)


def close_to(answer, expected: np.ndarray) -> bool:
    """The same images up to one grey level (another process may sum floats in another order)."""
    answer = np.asarray(answer)
    return answer.shape == expected.shape and int(np.abs(answer.astype(int) - expected).max()) <= 1


class Client(threading.Thread):
    """Requests one after another until stopped (at most 3 minutes): when each was sent and
    answered, its status, and the body of a failure."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.answers = url, threading.Event(), []

    def run(self):
        deadline = time.monotonic() + 180
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            payload = {"dataframe_records": [{"num_images": 1}], "params": {"seed": i, "sampler": "ddim", "steps": 2}}
            sent = time.monotonic()
            try:
                status, body = call(self.url, payload, timeout=60)
            except OSError as error:   # refused, reset: a gap in serving
                status, body = None, repr(error)
            self.answers.append((sent, time.monotonic(), status, body if status != 200 else None))
            i += 1
            time.sleep(0.02)


def test_the_server_follows_the_champion_switches_without_a_gap_and_refuses_a_broken_version(
        mlflow_store, tmp_path):
    import mlflow.pyfunc

    from tasks import contract, tracking

    started = time.monotonic()
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("serve-test")).info.run_id
    first, second = tiny_checkpoint(tmp_path / "v1", steps=2), tiny_checkpoint(tmp_path / "v2", steps=6)
    assert register(client, run_id, first) == "1"
    client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "1")

    def drawn_by(version: str) -> np.ndarray:   # what REQUEST gets from the version itself
        return mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").predict({"num_images": 2},
                                                                             params=REQUEST["params"])

    expected = {"1": drawn_by("1")}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_store,
           "DDPM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--model-name", NAME, "--port",
                                   str(port), "--poll-seconds", "0.5", "--check-seconds", "60"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    clients: list[Client] = []
    try:
        def ping():
            try:
                return call(f"{base}/ping", timeout=2)[0] == 200
            except OSError:   # not listening yet
                return False

        wait_for(ping, "/ping", 120, server, log)
        print(f"serving after {time.monotonic() - started:.1f} s")

        # v1 serves, answers as the model itself does, speaks MLflow's protocol and its errors
        status, version = call(f"{base}/version")
        assert status == 200 and version["version"] == "1" and version["model_name"] == NAME, version
        assert version["last_check"]["version"] == "1" and version["last_check"]["result"] == "passed"
        wait_for(lambda: client.get_model_version(NAME, "1").tags.get(contract.SERVING_CHECK_TAG) == "passed",
                 "version 1 tagged passed", 30, server, log)
        status, answer = call(f"{base}/invocations", REQUEST)
        assert status == 200 and close_to(answer["predictions"], expected["1"])
        split = {"dataframe_split": {"columns": ["num_images"], "data": [[2]]}, "params": REQUEST["params"]}
        assert close_to(call(f"{base}/invocations", split)[1]["predictions"], expected["1"])
        status, error = call(f"{base}/invocations", {"dataframe_records": [{"num_images": 100}]})
        assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", error
        assert "'num_images' must be between 1 and 8, got 100" in error["message"]
        assert call(f"{base}/health")[0] == 200 and call(f"{base}/nowhere")[0] == 404

        # v2: the server switches while a client sends requests without pause; none fails
        clients.append(Client(f"{base}/invocations"))
        clients[0].start()
        assert register(client, run_id, second) == "2"
        expected["2"] = drawn_by("2")
        assert not close_to(expected["2"], expected["1"])   # the two versions draw different images
        client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "2")
        moved = time.monotonic()
        wait_for(lambda: call(f"{base}/version")[1]["version"] == "2", "switch to version 2", 90, server, log)
        switched = time.monotonic()
        print(f"switched to v2 {switched - moved:.1f} s after the alias moved")
        status, answer = call(f"{base}/invocations", REQUEST)
        assert status == 200 and close_to(answer["predictions"], expected["2"])
        version = call(f"{base}/version")[1]
        assert version["last_check"] == {**version["last_check"], "version": "2", "result": "passed"}
        # the verdict is tagged on the version once it serves (the time first, the result last)
        wait_for(lambda: client.get_model_version(NAME, "2").tags.get(contract.SERVING_CHECK_TAG) == "passed",
                 "version 2 tagged passed", 30, server, log)

        # v3 draws NaN: never served, tagged failed with the reason, the alias back on v2
        assert register(client, run_id, nan_checkpoint(second, tmp_path / "v3")) == "3"
        client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "3")
        wait_for(lambda: client.get_model_version(NAME, "3").tags.get(contract.SERVING_CHECK_TAG) == "failed"
                 and str(client.get_model_version_by_alias(NAME, contract.CHAMPION_ALIAS).version) == "2",
                 "v3 refused and the alias back on v2", 90, server, log)
        reason = client.get_model_version(NAME, "3").tags[contract.SERVING_REASON_TAG]
        assert "non-finite" in reason, reason
        version = call(f"{base}/version")[1]
        assert version["version"] == "2" and version["last_check"]["version"] == "3"
        assert version["last_check"]["result"] == "failed" and "non-finite" in version["last_check"]["reason"]
        time.sleep(1.5)   # a few more polls: the alias stays on v2, no second rollback
        status, answer = call(f"{base}/invocations", REQUEST)
        assert status == 200 and close_to(answer["predictions"], expected["2"])

        clients[0].stop.set()
        clients[0].join(timeout=90)
        answers = clients[0].answers
        failures = [a for a in answers if a[2] != 200]
        assert not failures, failures[:5]
        # answered before the alias moved, while v2 was checked and swapped in, and after
        assert any(end < moved for _, end, *_ in answers), len(answers)
        assert any(sent <= switched and end >= moved for sent, end, *_ in answers), len(answers)
        assert any(sent > switched for sent, *_ in answers), len(answers)
        print(f"{len(answers)} client requests, none failed")

        # SIGTERM: a clean stop, exit 0, the port free again
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()[-3000:]
        with socket.socket() as sock:   # no listener left (closed connections may linger in TIME_WAIT,
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # which a new server, as ours, reuses)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        for c in clients:
            c.stop.set()
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = log.read_text().splitlines()
    rollback = [line for line in lines if "failed its serving check" in line]
    assert len(rollback) == 1 and "still serving version 2" in rollback[0], lines
    assert "champion moved back to version 2" in rollback[0]
    plain = [line for line in lines if not line.startswith("{")]   # the access log is JSON lines
    assert "Traceback" not in log.read_text() and "stopped serving" in plain[-1], lines[-5:]

    # the other ways a version fails its check: too slow, and a bundle that does not load
    from tasks.champion_server import CheckFailed, check_version

    with pytest.raises(CheckFailed, match=r"no answer within 0.001 s \(still loading\)"):
        check_version(NAME, "2", check_seconds=0.001)
    source = client.get_logged_model(client.get_model_version(NAME, "1").source.removeprefix("models:/"))
    [bundled] = Path(source.artifact_location.removeprefix("file://")).rglob("step-*.pt")
    bundled.write_bytes(bundled.read_bytes()[:-10])   # truncated: its sha256 no longer matches
    with pytest.raises(CheckFailed, match="it does not load: CheckpointError"):
        check_version(NAME, "1", check_seconds=60)

    # a champion that fails its check when the server starts: one line, nothing listening after
    from tasks.champion_server import ChampionServer, ServeError

    client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "3")
    with pytest.raises(ServeError, match="version 3, the champion, failed its serving check: .*non-finite"):
        ChampionServer(NAME, port, log=print).open()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    print(f"champion server test: {time.monotonic() - started:.0f} s")


def test_a_port_in_use_is_one_line(tmp_path, monkeypatch, capsys):
    env = {"DDPM_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_error_line(["serve", "--port", port], 1, f"port {port} on 127.0.0.1 is already in use",
                              env, tmp_path, monkeypatch, capsys)


def test_no_champion_no_model_and_no_store_are_one_line_each(tmp_path, monkeypatch, capsys):
    from tasks import tracking

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"DDPM_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": store}
    serve = ["serve", "--model-name", NAME, "--port", free_port()]
    assert_one_error_line(serve, 1, "no MLflow store at", env, tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "mlflow.db").exists()   # not created empty by asking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    tracking.client().create_registered_model("other")
    assert_one_error_line(serve, 1, f"no registered model '{NAME}'", env, tmp_path, monkeypatch, capsys)
    tracking.client().create_registered_model(NAME)
    assert_one_error_line(serve, 1, f"registered model '{NAME}' has no 'champion' alias; `ddpm promote",
                          env, tmp_path, monkeypatch, capsys)

    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    assert_one_error_line(serve, 1, "is unreachable", down, tmp_path, monkeypatch, capsys)


def test_only_finite_uint8_images_of_the_declared_shape_pass():
    from tasks.champion_server import CheckFailed, verify_images

    verify_images(np.zeros((2, 1, 16, 16), np.uint8), (1, 16, 16))
    verify_images(np.zeros((2, 3, 8, 8), np.uint8), None)   # no tensor spec: any (2, C, H, W)
    for images, message in [(np.zeros((2, 1, 16, 8), np.uint8), r"shape \(2, 1, 16, 8\), expected \(2, 1, 16, 16\)"),
                            (np.zeros((3, 1, 16, 16), np.uint8), "shape"),
                            (np.full((2, 1, 16, 16), np.nan, np.float32), "non-finite"),
                            (np.zeros((2, 1, 16, 16), np.float32), "float32 images, not uint8"),
                            (["iVBOR"], "a list, not an array")]:
        with pytest.raises(CheckFailed, match=message):
            verify_images(images, (1, 16, 16))


def test_the_default_store_in_ddpm_home_serves_without_mlflow_tracking_uri(tmp_path, monkeypatch):
    """With MLFLOW_TRACKING_URI unset the store is $DDPM_HOME/mlflow.db, for the registry reads and
    for loading the model alike: the champion passes its check, no ./mlflow.db appears."""
    import mlflow

    from tasks import tracking
    from tasks.champion_server import ChampionServer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("serve-default")).info.run_id
    assert register(client, run_id, tiny_checkpoint(tmp_path / "ckpt")) == "1"
    client.set_registered_model_alias(NAME, "champion", "1")
    mlflow.set_tracking_uri(None)   # as a fresh `ddpm serve` process starts
    with ChampionServer(NAME, port=0, log=lambda _: None).start() as server:
        assert call(f"{server.url}/version")[1]["version"] == "1"
        assert call(f"{server.url}/invocations", REQUEST)[0] == 200
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "home" / "mlflow.db").exists()
    assert client.get_model_version(NAME, "1").tags["serving.check"] == "passed"

"""`ddpm serve` under load and at its edges: a real server (uvicorn) on a free 127.0.0.1 port, a real
sqlite store and a tiny registered model.

Bursts past the bound answer 503 with Retry-After (never a reset), concurrent requests are drawn in
one batch with the images each would get alone, a client that goes away stops its drawing, CSV and
deep JSON get one clear answer without a trace, the token is enforced, /metrics counts, SIGTERM
answers what is in flight and exits 0, replicas on one store agree on a failed version, and a
read-only store does not flood the log.
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

from test_cli import assert_one_error_line
from test_champion_server import close_to, free_port, nan_checkpoint, register, wait_for
from trained_runs import tiny_checkpoint

pytestmark = pytest.mark.slow   # real servers and registered versions

REPO = Path(__file__).resolve().parents[1]
NAME = "served"
TOKEN = "t0ken-for-the-tests-0123456789"


def call(url: str, body=None, content_type: str = "application/json", headers: dict | None = None,
         timeout: float = 60) -> tuple[int, str, dict]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), {k.lower(): v for k, v in error.headers.items()}


def one(seed: int, steps: int = 3, images: int = 1, sampler: str = "ddim") -> dict:
    return {"dataframe_records": [{"num_images": images}], "params": {"seed": seed, "sampler": sampler,
                                                                       "steps": steps}}


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples named `name` (any labels) in Prometheus' text format."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {"))


@pytest.fixture
def store(mlflow_store, tmp_path):
    """v1 the champion of NAME (a tiny model, max_images 8), and the model itself for expectations."""
    import mlflow.pyfunc

    from tasks import contract, tracking

    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("serve-load")).info.run_id
    checkpoint = tiny_checkpoint(tmp_path / "v1", steps=2)
    assert register(client, run_id, checkpoint) == "1"
    client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "1")
    return {"client": client, "run_id": run_id, "checkpoint": checkpoint,
            "model": mlflow.pyfunc.load_model(f"models:/{NAME}/1")}


def burst(url: str, payloads: list[dict], headers: dict | None = None) -> list[tuple]:
    """All payloads at once, one thread each: (status, body, headers) or ('error', repr)."""
    answers: list = [None] * len(payloads)
    barrier = threading.Barrier(len(payloads))

    def send(i):
        barrier.wait()
        try:
            answers[i] = call(url, payloads[i], headers=headers)
        except OSError as error:   # a reset, a refusal: what must never happen
            answers[i] = ("error", repr(error), {})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_past_the_bound_503_with_retry_after_and_concurrent_requests_share_a_batch(store):
    from tasks.champion_server import ChampionServer
    from tasks.serving_http import Limits

    model = store["model"]
    with ChampionServer(NAME, port=0, log=print, limits=Limits(max_queue=6, max_batch_images=8)).start() as server:
        url = f"{server.url}/invocations"
        # 30 clients at once against a bound of 6: answers only, 200 or 503 + Retry-After, no reset
        payloads = [one(seed, steps=20) for seed in range(30)]
        answers = burst(url, payloads)
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503}, [a for a in answers if a[0] not in (200, 503)][:3]
        assert 6 <= statuses.count(200) < 30 and statuses.count(503) >= 1, statuses
        for status, body, headers in answers:
            if status == 503:
                assert int(headers["retry-after"]) >= 1 and "bound of 6" in json.loads(body)["message"]
            else:   # each its own images, as the model draws them alone, batched or not
                seed = payloads[answers.index((status, body, headers))]["params"]["seed"]
                alone = model.predict({"num_images": 1}, params=one(seed, steps=20)["params"])
                assert close_to(json.loads(body)["predictions"], alone)

        metrics = call(f"{server.url}/metrics")[1]
        assert metric(metrics, 'ddpm_serve_requests_total{path="/invocations",status="200"}') == statuses.count(200)
        assert metric(metrics, 'ddpm_serve_requests_total{path="/invocations",status="503"}') == statuses.count(503)
        assert metric(metrics, "ddpm_serve_images_total") == statuses.count(200)
        # fewer batches than requests drawn: some were drawn together
        batches = metric(metrics, "ddpm_serve_batch_requests_count")
        assert 1 <= batches < statuses.count(200), metrics
        assert 'ddpm_serve_version_info{model_name="served",version="1"} 1.0' in metrics
        assert metric(metrics, 'ddpm_serve_checks_total{result="passed"}') == 1

        # below the bound, nothing is refused: 6 at once, all 200
        assert [a[0] for a in burst(url, [one(seed) for seed in range(6)])] == [200] * 6


def test_csv_deep_json_and_bad_requests_get_one_clear_answer_without_a_trace(store):
    from tasks.champion_server import ChampionServer

    with ChampionServer(NAME, port=0, log=print).start() as server:
        url = f"{server.url}/invocations"
        status, body, _ = call(url, one(3, images=2))
        assert status == 200
        status, csv, _ = call(url, b"num_images\n2\n", "text/csv")   # documented, and was always a 400
        assert status == 200 and np.array(json.loads(csv)["predictions"]).shape == (2, 1, 16, 16)
        cases = [
            (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deeply"),   # was a 500
            (b"{nope", "application/json", 400, "valid JSON"),
            (json.dumps({"dataframe_records": [{"num_images": 100}]}).encode(), "application/json", 400,
             "'num_images' must be between 1 and 8, got 100"),
            (b"num_images\n100\n", "text/csv", 400, "'num_images' must be between 1 and 8, got 100"),
        ]
        for payload, content_type, expected, message in cases:
            status, body, _ = call(url, payload, content_type)
            answer = json.loads(body)
            assert status == expected and message in answer["message"], (status, body[:300])
            assert "stack_trace" not in answer and "Traceback" not in body and "site-packages" not in body
            assert "\n" not in answer["message"] and len(answer["message"]) < 1200
        assert call(f"{server.url}/nowhere")[0] == 404
        # a body over 1 MiB is refused from its Content-Length, before it is sent
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 << 20))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "at most 1048576 bytes" in json.loads(response.read())["message"]
        connection.close()


def test_a_token_is_required_beyond_loopback_and_enforced_when_set(store, tmp_path, monkeypatch, capsys):
    from tasks.champion_server import ChampionServer, ServeError

    with pytest.raises(ServeError, match="serving on 0.0.0.0 needs a token"):
        ChampionServer(NAME, port=0, host="0.0.0.0")
    env = {"DDPM_HOME": os.environ["DDPM_HOME"], "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    assert_one_error_line(["serve", "--model-name", NAME, "--host", "0.0.0.0", "--port", free_port()], 1,
                          "serving on 0.0.0.0 needs a token", env, tmp_path, monkeypatch, capsys)
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert_one_error_line(["serve", "--model-name", NAME, "--token-file", short, "--port", free_port()], 1,
                          "the serving token must be at least 16 characters", env, tmp_path, monkeypatch, capsys)

    with ChampionServer(NAME, port=0, log=print, token=TOKEN).start() as server:
        url = f"{server.url}/invocations"
        status, body, headers = call(url, one(1))
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "Bearer" in json.loads(body)["message"]
        assert call(url, one(1), headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        assert call(url, one(1), headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert call(f"{server.url}/metrics")[0] == 401 and call(f"{server.url}/version")[0] == 401
        assert call(f"{server.url}/ping")[0] == 200   # health probes need no token


def test_a_client_that_goes_away_stops_its_drawing(store):
    from tasks.champion_server import ChampionServer

    with ChampionServer(NAME, port=0, log=print).start() as server:
        heavy = one(5, steps=100, images=8, sampler="heun")   # ~200 network evaluations of 8 images (the most
        # this test model allows: 100 timesteps, 8 images)
        started = time.monotonic()
        assert call(f"{server.url}/invocations", heavy)[0] == 200
        whole = time.monotonic() - started
        assert whole > 0.25, f"the heavy request took {whole:.2f} s: too short to see it stop"

        body = json.dumps(heavy).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: server.drawer.drawing == 1, "the draw to start", 10)
            left = time.monotonic()
        wait_for(lambda: server.drawer.drawing == 0, "the draw to stop", 30)
        stopped = time.monotonic() - left
        # left at the draw's start: a draw that did not stop would have run about `whole` more seconds
        # (the server notices a closed connection within ~0.2 s here)
        assert stopped < 0.75 * whole, f"drawing went on {stopped:.2f} s after the client left (whole: {whole:.2f} s)"
        metrics = call(f"{server.url}/metrics")[1]
        assert metric(metrics, "ddpm_serve_images_total") == 8   # the first one only


def test_sigterm_answers_the_request_in_flight_and_exits_0(store, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--model-name", NAME, "--port",
                                   str(port), "--poll-seconds", "0.5"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ping():
            try:
                return call(f"{base}/ping", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ping, "/ping", 120, server, log)
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(
            call(f"{base}/invocations", one(5, steps=100, images=8, sampler="heun"))))
        request.start()
        wait_for(lambda: "ddpm_serve_requests_in_flight 1.0" in call(f"{base}/metrics")[1], "a request in flight",
                 30, server, log)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
        request.join(timeout=30)
        assert answer and answer[0][0] == 200, answer
        assert np.array(json.loads(answer[0][1])["predictions"]).shape == (8, 1, 16, 16)
        with pytest.raises(OSError):   # nothing listens any more
            call(f"{base}/ping", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    access = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    drawn = [entry for entry in access if entry["path"] == "/invocations"]
    assert drawn and drawn[-1]["status"] == 200 and drawn[-1]["images"] == 8 and drawn[-1]["version"] == "1"
    assert {"time", "client", "method", "seconds"} <= set(drawn[-1])
    assert "stopped serving" in [line for line in text.splitlines() if not line.startswith("{")][-1]


def test_replicas_on_one_store_agree_that_a_failed_version_is_served_by_none(store, tmp_path):
    """Two servers on one store; a new version that one of them fails (its check time bound is too
    short to load it) is served by neither, and the alias goes back."""
    from tasks import contract
    from tasks.champion_server import SERVING_CHECKED_AT_TAG, ChampionServer

    client = store["client"]
    lines: dict[str, list[str]] = {"strict": [], "lenient": []}
    strict = ChampionServer(NAME, port=0, poll_seconds=0.3, check_seconds=60, log=lines["strict"].append)
    lenient = ChampionServer(NAME, port=0, poll_seconds=0.3, check_seconds=60, log=lines["lenient"].append)
    with strict.start(), lenient.start():
        strict.check_seconds = 0.001   # from now on it fails every new version: too slow to load
        assert register(client, store["run_id"], tiny_checkpoint(tmp_path / "v2", steps=6)) == "2"
        client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "2")
        wait_for(lambda: client.get_model_version(NAME, "2").tags.get(contract.SERVING_CHECK_TAG) == "failed",
                 "v2 failed on the strict replica", 60)
        assert float(client.get_model_version(NAME, "2").tags[SERVING_CHECKED_AT_TAG]) > time.time() - 60
        wait_for(lambda: str(client.get_model_version_by_alias(NAME, contract.CHAMPION_ALIAS).version) == "1",
                 "the alias back on v1", 60)
        time.sleep(2)   # several polls of both
        for server in (strict, lenient):
            assert call(f"{server.url}/version")[1] and json.loads(call(f"{server.url}/version")[1])["version"] == "1"
        assert any("version 2 failed" in line for line in lines["strict"]), lines
        # the lenient replica either never saw the alias on v2 (moved back before its next poll), or
        # saw it and stood down on the strict one's verdict; it never keeps serving v2
        if any("now serving version 2" in line or "is now version 2" in line for line in lines["lenient"]):
            assert any("another replica" in line for line in lines["lenient"]), lines


def test_a_read_only_store_says_the_failed_rollback_once(store, tmp_path):
    """A version that fails its check on a store the server cannot write: the rollback fails, said in
    one line, not once per poll."""
    import mlflow

    from tasks import contract
    from tasks.champion_server import ChampionServer

    client = store["client"]
    assert register(client, store["run_id"], nan_checkpoint(store["checkpoint"], tmp_path / "v2")) == "2"
    # the store seen through a read-only bind mount: the server reads it, the test writes beside it
    db = Path(client.tracking_uri.removeprefix("sqlite:///"))
    view = tmp_path / "ro"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(db.parent), str(view)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a read-only view needs mount rights (root): {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        uri = f"sqlite:///{view / db.name}"
        lines: list[str] = []
        with ChampionServer(NAME, port=0, poll_seconds=0.2, log=lines.append, tracking=uri).start() as server:
            client.set_registered_model_alias(NAME, contract.CHAMPION_ALIAS, "2")
            wait_for(lambda: any("could not be moved back" in line for line in lines), "the failed rollback", 60)
            time.sleep(3)   # 15 polls
            assert json.loads(call(f"{server.url}/version")[1])["version"] == "1"
        rollbacks = [line for line in lines if "failed its serving check" in line]
        assert len(rollbacks) == 1 and "retrying quietly" in rollbacks[0], lines
        assert len(lines) <= 5, lines   # tags not written (v1 at start, v2), the switch notice, the rollback
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
        mlflow.set_tracking_uri(client.tracking_uri)


def test_keep_alive_connections_answer_without_waiting_for_the_clients_ack(store):
    """Nagle's algorithm off on every accepted connection: with it on, each keep-alive answer (its
    headers and body, two writes) waited ~40 ms for the client's delayed ACK."""
    import http.client

    from tasks.champion_server import ChampionServer

    with ChampionServer(NAME, port=0).start() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for _ in range(2):
            connection.request("GET", "/ping")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        sockets = [c.transport.get_extra_info("socket") for c in server.uvicorn.server_state.connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
        connection.close()


def test_requests_that_wait_while_a_batch_draws_are_drawn_together_however_many(store):
    """40 requests arrive while a batch draws (one drawing thread, held until they have all
    queued): the next batch holds all 40. Each admitted request waits in a thread of its own;
    asyncio's default pool (cores + 4 threads, at most 32) let at most 31 of them reach the queue."""
    from tasks.champion_server import ChampionServer
    from tasks.serving_http import Limits

    with ChampionServer(NAME, port=0, limits=Limits(max_queue=64, max_batch_images=64, draw_threads=1)).start() as server:
        url = f"{server.url}/invocations"
        inner = server.served.model.unwrap_python_model()
        real, gate, batches = inner.draw, threading.Event(), []

        def held_draw(draws, progress=None):   # the first batch waits for the gate: a long draw
            batches.append(len(draws))
            if len(batches) == 1:
                gate.wait(60)
            return real(draws, progress=progress)

        inner.draw = held_draw
        answers: dict = {}
        first = threading.Thread(target=lambda: answers.update(first=call(url, one(0))))
        first.start()
        wait_for(lambda: batches == [1], "the first batch drawing", 30)
        rest = threading.Thread(target=lambda: answers.update(rest=burst(url, [one(seed) for seed in range(1, 41)])))
        rest.start()
        try:
            wait_for(lambda: len(server.drawer.pending) == 40, "40 requests waiting in the queue", 60)
        finally:
            gate.set()
            first.join(60)
            rest.join(60)
        assert answers["first"][0] == 200 and [a[0] for a in answers["rest"]] == [200] * 40, answers
        assert batches == [1, 40]

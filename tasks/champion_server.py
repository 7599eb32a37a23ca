"""Serve the registered model's `champion`, following the alias safely (the MLflow side; no Prefect).

    ChampionServer   an HTTP server on 127.0.0.1:PORT for models:/<name>@champion, with a watcher thread
    serve            run one until Ctrl-C / SIGTERM (`ddpm serve` and the flow `serve_champion` call it)
    check_version    load one registered version and check it answers like a served model should
    ServeError       what stops a server before it starts, as one line

The HTTP side speaks MLflow's scoring protocol: each request goes through
`mlflow.pyfunc.scoring_server.invocations`, the function `mlflow models serve` runs, so
`POST /invocations` takes what that server takes (`dataframe_records`, `dataframe_split`, `inputs`,
`instances`, CSV; `params`) and answers `{"predictions": ...}`, and a served model's
MlflowException keeps its HTTP status (INVALID_PARAMETER_VALUE: 400) and its JSON body.
`GET /ping` and `GET /health` answer 200; `GET /version` says which registered version is serving,
since when, and the last check's result (MLflow's own /version is its package version). It is
http.server's ThreadingHTTPServer, a thread per connection, at most PARALLEL_PREDICTIONS drawing
at once (the others wait their turn).

The watcher polls the alias every `poll_seconds`. When `champion` names another version, that
version is loaded in the background and checked (a fixed-seed request for two images drawn in a
few steps must answer, within `check_seconds` of the start of loading, with a uint8 array of the
shape its signature declares); only then does the reference that requests read change (one
assignment: a request reads it once, so it is answered by the old model or the new one, never by
none). A version that fails is never served: it is tagged `serving.check=failed` with
`serving.reason`, and the alias goes back to the version still serving (unless it moved on again
meanwhile). A version that passes is tagged `serving.check=passed`.
"""

from __future__ import annotations

import contextvars
import errno
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks import contract
from tasks.config import one_line
from tasks.settings import ServerUnreachable, check_reachable, tracking_uri

CHAMPION = contract.CHAMPION_ALIAS
HOST = "127.0.0.1"
DEFAULT_PORT = 5055
DEFAULT_POLL_SECONDS = 10.0
DEFAULT_CHECK_SECONDS = 120.0
# the check: two images of a fixed seed, a few DDIM steps (fewer when the model allows fewer)
CHECK_IMAGES, CHECK_STEPS = 2, 4
CHECK_PARAMS = {"seed": 0, "sampler": "ddim", "eta": 0.0}
MAX_REQUEST_BYTES = 16 * 1024 * 1024
PARALLEL_PREDICTIONS = 4   # requests drawing at once; more wait their turn (each one's torch uses every core)
REASON_CHARS = 500   # serving.reason is one line, short enough for the registry UI


class ServeError(Exception):
    """A server that cannot start (the port, the store, the model, its champion); one line."""


class CheckFailed(Exception):
    """A version that must not be served; the message is the reason."""


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Served:
    """The model requests go to: swapped as a whole, never changed in place."""

    version: str
    model: Any            # mlflow.pyfunc.PyFuncModel
    input_schema: Any
    run_id: str | None
    since: float


@dataclass(frozen=True)
class Check:
    """The result of checking one version."""

    version: str
    result: str           # contract.SERVING_CHECK_PASSED / SERVING_CHECK_FAILED
    reason: str
    seconds: float
    at: float

    def as_json(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 2), "at": utc(self.at)}


# --- the check -------------------------------------------------------------------------------------


def expected_shape(model) -> tuple[int, ...] | None:
    """(C, H, W) of one image, from the output tensor spec of the model's signature (None: no spec)."""
    schema = model.metadata.get_output_schema()
    specs = schema.inputs if schema is not None else []
    shape = getattr(specs[0], "shape", None) if len(specs) == 1 else None
    return tuple(int(s) for s in shape[1:]) if shape is not None and len(shape) == 4 else None


def check_params(model) -> dict:
    """CHECK_PARAMS with CHECK_STEPS, or fewer when the model's T or step bound is smaller."""
    steps = CHECK_STEPS
    try:
        inner = model.unwrap_python_model()
        steps = min(steps, int(inner.diffusion_config.num_timesteps), int(inner.max_steps))
    except Exception:  # noqa: BLE001 (not our pyfunc: the defaults)
        pass
    return {**CHECK_PARAMS, "steps": max(1, steps)}


def verify_images(images, shape: tuple[int, ...] | None) -> None:
    """Raise CheckFailed unless `images` is a finite uint8 array (CHECK_IMAGES, *shape)."""
    if not isinstance(images, np.ndarray):
        raise CheckFailed(f"its check request answered a {type(images).__name__}, not an array of images")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise CheckFailed("its check request answered non-finite values (NaN or inf)")
    if images.dtype != np.uint8:
        raise CheckFailed(f"its check request answered {images.dtype} images, not uint8")
    want = (CHECK_IMAGES, *shape) if shape else None
    if images.ndim != 4 or images.shape[0] != CHECK_IMAGES or (want and images.shape != want):
        raise CheckFailed(f"its check request answered shape {images.shape}, expected "
                          f"{want or f'({CHECK_IMAGES}, C, H, W)'}")


def check_version(model_name: str, version: str, check_seconds: float = DEFAULT_CHECK_SECONDS):
    """Load version `version` of `model_name` and check it; (model, seconds) or CheckFailed.

    Loading and the check request run in a thread of their own and must be done within
    `check_seconds` together; a thread that overruns is left to finish on its own (Python cannot
    stop it) and its model is dropped."""
    uri = f"models:/{model_name}/{version}"
    outcome: dict[str, Any] = {}

    def work():
        try:
            outcome["model"] = model = mlflow.pyfunc.load_model(uri)
            outcome["images"] = model.predict(pd.DataFrame({"num_images": [CHECK_IMAGES]}),
                                              params=check_params(model))
        except BaseException as error:  # noqa: BLE001 (reported as the check's reason)
            outcome["error"] = error

    started = time.monotonic()
    worker = threading.Thread(target=work, name=f"check-{model_name}-{version}", daemon=True)
    worker.start()
    worker.join(check_seconds)
    seconds = time.monotonic() - started
    if worker.is_alive():
        doing = "drawing its check images" if "model" in outcome else "loading"
        raise CheckFailed(f"no answer within {check_seconds:g} s (still {doing})")
    if "error" in outcome:
        what = "its check request failed" if "model" in outcome else "it does not load"
        raise CheckFailed(f"{what}: {type(outcome['error']).__name__}: {one_line(outcome['error'])}")
    verify_images(outcome["images"], expected_shape(outcome["model"]))
    return outcome["model"], seconds


# --- the store ---------------------------------------------------------------------------------------


def store_client(uri: str | None = None) -> MlflowClient:
    """A client of the tracking store, after making sure it is there: an sqlite file that does
    not exist would otherwise be created empty, and an HTTP server that is down retried for minutes."""
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    # sqlite:////abs/path.db, sqlite:///relative.db (SQLAlchemy's forms); file:/path or a plain path
    path = unquote(parsed.path[1:]) if parsed.scheme == "sqlite" else unquote(parsed.path) \
        if parsed.scheme in ("", "file") else None
    if path and path != ":memory:" and not Path(path).exists():
        raise ServeError(f"no MLflow store at {Path(path).resolve()} (MLFLOW_TRACKING_URI={uri}): point "
                         "MLFLOW_TRACKING_URI at the store your models are registered in")
    try:
        check_reachable(uri, "the MLflow tracking server (MLFLOW_TRACKING_URI)")
    except ServerUnreachable as error:
        raise ServeError(str(error)) from None
    try:
        client = MlflowClient(uri)
    except Exception as error:  # noqa: BLE001 (a store MLflow refuses: an old file store, an unknown scheme)
        raise ServeError(f"cannot open the MLflow store {uri}: {one_line(error)}") from None
    # mlflow.pyfunc.load_model("models:/...") resolves through the process-wide tracking URI (the
    # registry follows it), not this client's. Never set_registry_uri: it also exports
    # MLFLOW_REGISTRY_URI, which then outlives the store for this process and its children.
    mlflow.set_tracking_uri(uri)
    return client


def champion_version(client: MlflowClient, model_name: str) -> str:
    """The version the alias names, or ServeError saying how to make one."""
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ServeError(f"no registered model {model_name!r} in {client.tracking_uri}; `ddpm promote "
                             f"--model-name {model_name}` registers the best run and makes it {CHAMPION}") from None
        raise ServeError(f"cannot read the MLflow store {client.tracking_uri}: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 (a store that cannot be read: database, network)
        raise ServeError(f"cannot read the MLflow store {client.tracking_uri}: {one_line(error)}") from None
    version = (registered.aliases or {}).get(CHAMPION)
    if version is None:
        raise ServeError(f"registered model {model_name!r} has no {CHAMPION!r} alias; `ddpm promote --model-name "
                         f"{model_name}` sets it (or MlflowClient().set_registered_model_alias({model_name!r}, "
                         f"{CHAMPION!r}, VERSION))")
    return str(version)


# --- the server ------------------------------------------------------------------------------------


class ChampionServer:
    """models:/<model_name>@champion on http://127.0.0.1:<port>, following the alias.

        server = ChampionServer("ddpm", 5055)
        server.open()             # ServeError: port, store, model, alias, the champion's own check
        server.serve_forever()    # or server.start() for a background thread; then server.close()

    `log` gets one line per event (a switch, a failed check and its rollback, the alias unreadable).
    """

    def __init__(self, model_name: str = contract.DEFAULT_MODEL_NAME, port: int = DEFAULT_PORT,
                 poll_seconds: float = DEFAULT_POLL_SECONDS, check_seconds: float = DEFAULT_CHECK_SECONDS,
                 host: str = HOST, log: Callable[[str], None] = print, tracking: str | None = None):
        if not (poll_seconds > 0 and check_seconds > 0):
            raise ServeError(f"poll_seconds and check_seconds must be > 0, got {poll_seconds} and {check_seconds}")
        self.model_name, self.port, self.host = model_name, int(port), host
        self.poll_seconds, self.check_seconds = float(poll_seconds), float(check_seconds)
        self.log, self.tracking = log, tracking
        self.client: MlflowClient | None = None
        self.served: Served | None = None        # read once per request: the atomic swap
        self.last_check: Check | None = None
        self.httpd: _HTTPServer | None = None
        self.slots = threading.BoundedSemaphore(PARALLEL_PREDICTIONS)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._http_thread: threading.Thread | None = None
        self._rejected: str | None = None        # the version that failed while the alias still names it
        self._last_problem: str | None = None    # the last alias-read error logged (logged once)

    # --- starting and stopping ---

    def open(self) -> "ChampionServer":
        """Everything before the first request, each mistake a ServeError of one line: bind the
        port, reach the store, find the model and its champion, load and check the champion."""
        try:
            self.httpd = _HTTPServer((self.host, self.port), _Handler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeError(f"port {self.port} on {self.host} is already in use (another server?); "
                                 "choose another with --port") from None
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        self.httpd.champion = self
        try:
            self.client = store_client(self.tracking)
            version = champion_version(self.client, self.model_name)
            started = time.monotonic()
            try:
                model, seconds = check_version(self.model_name, version, self.check_seconds)
            except CheckFailed as failure:
                self._record(Check(version, contract.SERVING_CHECK_FAILED, str(failure), time.monotonic() - started,
                                   time.time()))
                raise ServeError(f"{self.model_name} version {version}, the {CHAMPION}, failed its serving check: "
                                 f"{failure}; point {CHAMPION} at a version that works") from None
            self.served = self._served(version, model)
            self._record(Check(version, contract.SERVING_CHECK_PASSED, self._passed(seconds), seconds, time.time()))
        except BaseException:
            self.httpd.server_close()
            raise
        self.port = self.httpd.server_address[1]   # port 0: the one the system chose
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _start_watcher(self) -> None:
        # in the caller's context: a flow run's logger then reaches that run's API (a thread of
        # its own would see no run and no API URL, and Prefect would start another server to log to)
        self._watcher = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,),
                                         name=f"watch-{self.model_name}", daemon=True)
        self._watcher.start()

    def serve_forever(self) -> None:
        """Answer requests in this thread until interrupted (Ctrl-C, SIGTERM); the watcher runs beside."""
        self._start_watcher()
        self.httpd.serve_forever(poll_interval=0.5)

    def start(self) -> "ChampionServer":
        """open() if not yet, then answer requests in a background thread (once: a second call,
        `with server.start():` included, returns the running server)."""
        if self._http_thread is not None:   # two serve_forever loops on one socket: one blocks in accept
            return self
        if self.httpd is None:
            self.open()
        self._start_watcher()
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                             name=f"serve-{self.model_name}", daemon=True)
        self._http_thread.start()
        return self

    def close(self) -> None:
        """Stop the watcher (a check under way is abandoned) and the server; the port is free after."""
        self._stop.set()
        if self._http_thread is not None:   # serve_forever in another thread: ask it to end
            self.httpd.shutdown()
            self._http_thread.join()
            self._http_thread = None
        if self.httpd is not None:
            self.httpd.server_close()
        if self._watcher is not None:
            self._watcher.join(timeout=2)

    def __enter__(self) -> "ChampionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- following the alias ---

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 (the store down for a while: keep serving)
                problem = one_line(error)
                if problem != self._last_problem:
                    self.log(f"{self.model_name}: cannot read the {CHAMPION} alias ({problem}); "
                             f"still serving version {self.served.version}")
                    self._last_problem = problem
            else:
                if self._last_problem is not None:
                    self.log(f"{self.model_name}: the {CHAMPION} alias is readable again")
                self._last_problem = None

    def poll(self) -> None:
        """One look at the alias: switch to a new champion that passes its check, else roll back."""
        version = str(self.client.get_model_version_by_alias(self.model_name, CHAMPION).version)
        serving = self.served
        if version == serving.version:
            self._rejected = None
            return
        if version == self._rejected:   # the rollback did not take: again, without a new check
            self._roll_back(version, self.last_check.reason)
            return
        self.log(f"{self.model_name}: {CHAMPION} is now version {version}; checking it "
                 f"(version {serving.version} keeps serving meanwhile)")
        started = time.monotonic()
        try:
            model, seconds = check_version(self.model_name, version, self.check_seconds)
        except CheckFailed as failure:
            if self._stop.is_set():
                return
            self._rejected = version
            self._record(Check(version, contract.SERVING_CHECK_FAILED, str(failure), time.monotonic() - started,
                               time.time()))
            self._roll_back(version, str(failure))
            return
        if self._stop.is_set():
            return
        self.served = self._served(version, model)   # the swap: the next request reads the new model
        self._rejected = None
        self._record(Check(version, contract.SERVING_CHECK_PASSED, self._passed(seconds), seconds, time.time()))
        self.log(f"{self.model_name}: now serving version {version} (checked in {seconds:.1f} s; "
                 f"was version {serving.version})")

    def _roll_back(self, failed: str, reason: str) -> None:
        """The alias back to the version serving, unless it moved on again meanwhile; one log line."""
        from tasks.tracking import store_lock

        keep = self.served.version
        try:
            with store_lock("promote"):   # a promotion landing meanwhile is not overwritten
                now = str(self.client.get_model_version_by_alias(self.model_name, CHAMPION).version)
                if now == failed:
                    self.client.set_registered_model_alias(self.model_name, CHAMPION, keep)
                    moved = f"{CHAMPION} moved back to version {keep}"
                else:
                    moved = f"{CHAMPION} already moved on to version {now}, left there"
        except Exception as error:  # noqa: BLE001 (retried at the next poll)
            moved = f"{CHAMPION} could not be moved back ({one_line(error)}); retrying at the next poll"
        self.log(f"{self.model_name} version {failed} failed its serving check ({reason}): still serving "
                 f"version {keep}; {moved}")

    def _served(self, version: str, model) -> Served:
        run_id = getattr(model.metadata, "run_id", None)
        return Served(version, model, model.metadata.get_input_schema(), run_id, time.time())

    def _passed(self, seconds: float) -> str:
        return f"drew {CHECK_IMAGES} images in {seconds:.1f} s (load included)"

    def _record(self, check: Check) -> None:
        """Keep the check for /version and write it on the version (the store may fail: logged)."""
        self.last_check = check
        try:
            self.client.set_model_version_tag(self.model_name, check.version, contract.SERVING_CHECK_TAG,
                                              check.result)
            self.client.set_model_version_tag(self.model_name, check.version, contract.SERVING_REASON_TAG,
                                              one_line(check.reason)[:REASON_CHARS])
        except Exception as error:  # noqa: BLE001
            self.log(f"{self.model_name}: could not tag version {check.version} {contract.SERVING_CHECK_TAG}="
                     f"{check.result}: {one_line(error)}")

    def status(self) -> dict:
        """What GET /version answers."""
        served = self.served
        return {"model_name": self.model_name, "alias": CHAMPION,
                "version": served.version if served else None,
                "model_uri": f"models:/{self.model_name}/{served.version}" if served else None,
                "run_id": served.run_id if served else None,
                "serving_since": utc(served.since) if served else None,
                "last_check": self.last_check.as_json() if self.last_check else None,
                "poll_seconds": self.poll_seconds, "check_seconds": self.check_seconds,
                "mlflow_version": mlflow.__version__}


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection (not waited for at close); a failed connection is one log line, not
    a traceback on stderr, and a client that went away is not even that."""

    daemon_threads = True
    champion: ChampionServer

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.champion.log(f"{self.champion.model_name}: a request from {client_address[0]} failed: "
                              f"{type(error).__name__}: {one_line(error)}")


class _Handler(BaseHTTPRequestHandler):
    """MLflow's scoring protocol on http.server: one request per connection (HTTP/1.0)."""

    server_version = "ddpm-champion"
    timeout = 60   # a client that stalls mid-request frees its thread

    def log_message(self, format, *args) -> None:   # noqa: A002 (no line per request on stderr)
        pass

    def _answer(self, status: int, body: str | bytes, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        champion: ChampionServer = self.server.champion
        path = urlparse(self.path).path
        if path in ("/ping", "/health"):
            self._answer(200 if champion.served is not None else 503, "\n")
        elif path == "/version":
            self._answer(200, json.dumps(champion.status()))
        else:
            self._answer(404, json.dumps({"error_code": "ENDPOINT_NOT_FOUND", "message": f"no {path} here"}))

    def do_POST(self) -> None:  # noqa: N802
        from mlflow.pyfunc.scoring_server import invocations

        if urlparse(self.path).path != "/invocations":
            return self._answer(404, json.dumps({"error_code": "ENDPOINT_NOT_FOUND",
                                                 "message": f"POST /invocations, not {self.path}"}))
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            return self._answer(413, json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                                 "message": f"send a Content-Length of at most "
                                                            f"{MAX_REQUEST_BYTES} bytes"}))
        data = self.rfile.read(length)
        champion = self.server.champion
        try:
            with champion.slots:
                served = champion.served   # read once: this request's model, whatever swaps meanwhile
                result = invocations(data, self.headers.get("Content-Type", ""), served.model, served.input_schema)
        except MlflowException as error:
            return self._answer(error.get_http_status_code(), error.serialize_as_json())
        except Exception as error:  # noqa: BLE001
            return self._answer(500, json.dumps({"error_code": "INTERNAL_ERROR", "message": one_line(error)}))
        self._answer(result.status, result.response, result.mimetype)


def serve(model_name: str = contract.DEFAULT_MODEL_NAME, port: int = DEFAULT_PORT,
          poll_seconds: float = DEFAULT_POLL_SECONDS, check_seconds: float = DEFAULT_CHECK_SECONDS,
          log: Callable[[str], None] = print) -> dict:
    """Serve models:/<model_name>@champion on 127.0.0.1:<port> in this thread until interrupted
    (KeyboardInterrupt, Prefect's TerminationSignal: re-raised after the server is closed).
    ServeError before anything starts."""
    server = ChampionServer(model_name, port, poll_seconds, check_seconds, log=log).open()
    log(f"serving models:/{model_name}@{CHAMPION} (version {server.served.version}) on {server.url}; "
        f"following the alias every {server.poll_seconds:g} s")
    try:
        server.serve_forever()
    finally:
        server.close()
        log(f"stopped serving {model_name} (version {server.served.version} was serving)")
    return server.status()

"""Serve the registered model's `champion`, following the alias safely (the MLflow side; no Prefect).

    ChampionServer   an HTTP server on 127.0.0.1:PORT for models:/<name>@champion, with a watcher thread
    serve            run one until Ctrl-C / SIGTERM (`ddpm serve` and the flow `serve_champion` call it)
    check_version    load one registered version and check it answers like a served model should
    ServeError       what stops a server before it starts, as one line

The HTTP side (tasks.serving_http) is the engine `mlflow models serve` runs, uvicorn and a FastAPI
application, and each request goes through `mlflow.pyfunc.scoring_server.invocations`, so
`POST /invocations` takes what that server takes (`dataframe_records`, `dataframe_split`, `inputs`,
`instances`, CSV; `params`) and answers `{"predictions": ...}`, and a served model's
MlflowException keeps its HTTP status (INVALID_PARAMETER_VALUE: 400) and its JSON body (without a
stack trace). `GET /ping` and `GET /health` answer 200; `GET /version` says which registered version
is serving, since when, and the last check's result (MLflow's own /version is its package
version); `GET /metrics` is Prometheus'. Requests in flight are bounded (serving_http.Limits: past
the bound, 503 with Retry-After), drawn by long-lived threads in batches. HTTP/1.1 keep-alive.
Beyond loopback only with a token (TOKEN_ENV or a token file).

The watcher polls the alias every `poll_seconds`. When `champion` names another version, that
version is loaded in the background and checked (a fixed-seed request for two images drawn in a
few steps must answer, within `check_seconds` of the start of loading, with a uint8 array of the
shape its signature declares); only then does the reference that requests read change (one
assignment: a request reads it once, so it is answered by the old model or the new one, never by
none). A version that fails is never served: it is tagged `serving.check=failed` with
`serving.reason`, and the alias goes back to the version still serving (unless it moved on again
meanwhile). A version that passes is tagged `serving.check=passed`. Each check also writes
`serving.checked_at` (epoch seconds), so that replicas (several servers on one store) agree: a
version another replica failed after the alias moved to it is not served here either, and a
replica serving a version that another one failed since goes back to the version it served before.

Stopping (close(), SIGTERM, Ctrl-C, a cancelled flow run): no new request is admitted (503), the
listening socket closes, the admitted requests are drawn and answered within
`Limits.stop_seconds` (then cancelled with 503), and the drawing threads are joined.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ddpm.machine import usable_cores
from tasks import contract
from tasks.config import one_line
from tasks.serving_http import Drawer, Limits, Metrics, install_drawer, make_app
from tasks.settings import ServerUnreachable, check_reachable, redact, tracking_uri

CHAMPION = contract.CHAMPION_ALIAS
HOST = "127.0.0.1"
DEFAULT_PORT = 5055
DEFAULT_POLL_SECONDS = 10.0
DEFAULT_CHECK_SECONDS = 120.0
# the check: two images of a fixed seed, a few DDIM steps (fewer when the model allows fewer)
CHECK_IMAGES, CHECK_STEPS = 2, 4
CHECK_PARAMS = {"seed": 0, "sampler": "ddim", "eta": 0.0}
REASON_CHARS = 500   # serving.reason is one line, short enough for the registry UI
# when a version was checked (epoch seconds, beside contract.SERVING_CHECK_TAG): replicas read it
SERVING_CHECKED_AT_TAG = contract.SERVING_CHECKED_AT_TAG
TOKEN_ENV = "DDPM_SERVE_TOKEN"   # the token clients must send (Authorization: Bearer ...)
MIN_TOKEN_CHARS = 16
BACKLOG = 2048                   # connections the kernel holds before accept (socketserver's was 5)
KEEP_ALIVE_SECONDS = 5           # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 1024           # open connections (idle keep-alive ones included); past it uvicorn answers 503


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
    torch_threads: int | None = None   # what the drawing thread runs torch on (tune_threads); None: its share


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


def check_version(model_name: str, version: str, check_seconds: float = DEFAULT_CHECK_SECONDS,
                  torch_threads: int | None = None):
    """Load version `version` of `model_name` and check it; (model, seconds) or CheckFailed.

    Loading and the check request run in a thread of their own and must be done within
    `check_seconds` together; a thread that overruns is left to finish on its own (Python cannot
    stop it) and its model is dropped. `torch_threads`: what that thread draws on (default: the
    usable cores; a new thread would otherwise take whatever count another thread set last)."""
    uri = f"models:/{model_name}/{version}"
    outcome: dict[str, Any] = {}

    def work():
        import torch

        torch.set_num_threads(torch_threads or usable_cores())
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


def tune_threads(model, most: int) -> tuple[int, dict[int, float]]:
    """The torch thread count (1 or `most`) that draws the check request fastest here, and the
    seconds each took (after a warm-up at that count). A small network's per-image work is too small
    to split over cores (tiny-16: two threads draw one image 2x slower than one); a large one's is
    not. Measured in this thread: torch's thread count is a per-thread setting."""
    import torch

    if most <= 1:
        return 1, {}
    own = torch.get_num_threads()
    frame, params = pd.DataFrame({"num_images": [CHECK_IMAGES]}), check_params(model)
    seconds: dict[int, float] = {}
    try:
        for threads in (1, most):
            torch.set_num_threads(threads)
            model.predict(frame, params=params)   # a warm-up at this count
            started = time.perf_counter()
            model.predict(frame, params=params)
            seconds[threads] = time.perf_counter() - started
    finally:
        torch.set_num_threads(own)
    return min(seconds, key=seconds.get), seconds


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
        raise ServeError(f"no MLflow store at {Path(path).resolve()} (MLFLOW_TRACKING_URI={redact(uri)}): point "
                         "MLFLOW_TRACKING_URI at the store your models are registered in")
    try:
        check_reachable(uri, "the MLflow tracking server (MLFLOW_TRACKING_URI)")
    except ServerUnreachable as error:
        raise ServeError(str(error)) from None
    try:
        client = MlflowClient(uri)
    except Exception as error:  # noqa: BLE001 (a store MLflow refuses: an old file store, an unknown scheme)
        raise ServeError(f"cannot open the MLflow store {redact(uri)}: {one_line(error)}") from None
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path | None = None) -> str | None:
    """The clients' token: the file's first line, else $DDPM_SERVE_TOKEN, else None; ServeError
    for a file that cannot be read or a token too short to resist guessing."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip().splitlines()[0].strip() if \
                Path(token_file).read_text().strip() else ""
        except OSError as error:
            raise ServeError(f"cannot read the token file {token_file}: {error.strerror or error}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServeError(f"the serving token must be at least {MIN_TOKEN_CHARS} characters without spaces "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


class ChampionServer:
    """models:/<model_name>@champion on http://<host>:<port>, following the alias.

        server = ChampionServer("ddpm", 5055)
        server.open()             # ServeError: port, store, model, alias, the champion's own check
        server.serve_forever()    # or server.start() for a background thread; then server.close()

    `log` gets one line per event (a switch, a failed check and its rollback, the alias unreadable).
    `host` beyond loopback needs a `token` (clients send `Authorization: Bearer <token>`).
    `reuse_port` lets several servers (replicas on one machine) listen on one port (SO_REUSEPORT).
    """

    def __init__(self, model_name: str = contract.DEFAULT_MODEL_NAME, port: int = DEFAULT_PORT,
                 poll_seconds: float = DEFAULT_POLL_SECONDS, check_seconds: float = DEFAULT_CHECK_SECONDS,
                 host: str = HOST, log: Callable[[str], None] = print, tracking: str | None = None,
                 limits: Limits | None = None, token: str | None = None, reuse_port: bool = False):
        if not (poll_seconds > 0 and check_seconds > 0):
            raise ServeError(f"poll_seconds and check_seconds must be > 0, got {poll_seconds} and {check_seconds}")
        if not is_loopback(host) and not token:
            raise ServeError(f"serving on {host} needs a token that clients must send: set {TOKEN_ENV} or "
                             "--token-file (or keep 127.0.0.1 behind a reverse proxy that authenticates; "
                             "docs/serving.md)")
        try:
            self.limits = limits or Limits()
        except ValueError as error:
            raise ServeError(str(error)) from None
        self.model_name, self.port, self.host = model_name, int(port), host
        self.poll_seconds, self.check_seconds = float(poll_seconds), float(check_seconds)
        self.log, self.tracking, self.token, self.reuse_port = log, tracking, token, reuse_port
        self.client: MlflowClient | None = None
        self.served: Served | None = None        # read once per request: the atomic swap
        self.previous: Served | None = None      # the version served before (a replica's way back)
        self.last_check: Check | None = None
        self.metrics = Metrics()
        self.drawer: Drawer | None = None
        self.sock: socket.socket | None = None
        self.uvicorn = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._http_thread: threading.Thread | None = None
        self._rejected: str | None = None        # the version that failed while the alias still names it
        self._rollback_failed: str | None = None # the version whose rollback failed (said once)
        # the alias's version and when it moved there, at the latest: this server's previous read of
        # the alias (which still saw another version); a poll late under load widens it, never misses
        self._seen: tuple[str, float] | None = None
        self._read_at: float | None = None   # when this server last read the alias
        self._last_problem: str | None = None    # the last alias-read error logged (logged once)
        self._closed = False

    # --- starting and stopping ---

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
        # they are TCP, and with Nagle on every keep-alive answer waited 40 ms for the client's ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                raise ServeError(f"port {self.port} on {self.host} is already in use (another server?); "
                                 "choose another with --port") from None
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        sock.set_inheritable(True)
        return sock

    def open(self) -> "ChampionServer":
        """Everything before the first request, each mistake a ServeError of one line: bind the
        port, reach the store, find the model and its champion, load and check the champion."""
        self.sock = self._listen()
        try:
            self.client = store_client(self.tracking)
            self._read_at = time.time()
            version = champion_version(self.client, self.model_name)
            started = time.monotonic()
            try:
                model, seconds = check_version(self.model_name, version, self.check_seconds,
                                               self.limits.torch_threads)
            except CheckFailed as failure:
                self._record(Check(version, contract.SERVING_CHECK_FAILED, str(failure), time.monotonic() - started,
                                   time.time()))
                raise ServeError(f"{self.model_name} version {version}, the {CHAMPION}, failed its serving check: "
                                 f"{failure}; point {CHAMPION} at a version that works") from None
            self.drawer = Drawer(self.limits, self.metrics)
            self._serve(self._served(version, model))
            self._record(Check(version, contract.SERVING_CHECK_PASSED, self._passed(seconds), seconds, time.time()))
        except BaseException:
            self.sock.close()
            if self.drawer is not None:
                self.drawer.close(0)
            raise
        self.port = self.sock.getsockname()[1]   # port 0: the one the system chose
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _start_watcher(self) -> None:
        # in the caller's context: a flow run's logger then reaches that run's API (a thread of
        # its own would see no run and no API URL, and Prefect would start another server to log to)
        self._watcher = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,),
                                         name=f"watch-{self.model_name}", daemon=True)
        self._watcher.start()

    def start(self) -> "ChampionServer":
        """open() if not yet, then answer requests from a background thread (uvicorn in an event
        loop of its own); once: a second call, `with server.start():` included, returns the server."""
        import uvicorn

        if self._http_thread is not None:
            return self
        if self.sock is None:
            self.open()
        app = make_app(self, self.limits, self.metrics, self.drawer, self.token)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                limit_concurrency=MAX_CONNECTIONS,
                                # past stop_seconds the drawer cancels; this only catches a hung write
                                timeout_graceful_shutdown=self.limits.stop_seconds + 10)
        self.uvicorn = uvicorn.Server(config)
        failed: list[BaseException] = []

        def run():
            try:
                asyncio.run(self.uvicorn.serve(sockets=[self.sock]))
            except BaseException as error:  # noqa: BLE001 (start() reports it)
                failed.append(error)

        self._http_thread = threading.Thread(target=run, name=f"serve-{self.model_name}", daemon=True)
        self._http_thread.start()
        while not self.uvicorn.started and self._http_thread.is_alive():
            time.sleep(0.01)
        if not self.uvicorn.started:
            self.close()
            raise ServeError(f"the HTTP server did not start: {one_line(failed[0]) if failed else 'no reason given'}")
        self._start_watcher()
        return self

    def serve_forever(self) -> None:
        """Answer requests until interrupted (Ctrl-C, SIGTERM as KeyboardInterrupt, a cancelled flow
        run's signal): then a graceful close, and the interruption goes on up."""
        self.start()
        try:
            while self._http_thread.is_alive():
                self._http_thread.join(0.5)
        finally:
            self.close()

    def close(self) -> None:
        """Stop gracefully: no new request (503), the listening socket closed, the admitted ones drawn
        and answered within limits.stop_seconds (then 503), the threads joined; the port is free after."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.uvicorn is not None:
            self.uvicorn.config.app.state.admission["stopping"] = True
            self.uvicorn.should_exit = True      # stops accepting, closes idle keep-alive connections
        if self.drawer is not None:
            admission = self.uvicorn.config.app.state.admission if self.uvicorn is not None else {}
            self.drawer.close(self.limits.stop_seconds, admitted=lambda: admission.get("in_flight", 0))
        if self._http_thread is not None:
            self._http_thread.join(timeout=self.limits.stop_seconds + 15)
            self._http_thread = None
        if self.uvicorn is not None:   # the requests' threads: idle once every request is answered
            self.uvicorn.config.app.state.requests_pool.shutdown(wait=False)
        if self.sock is not None:
            self.sock.close()
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

    def _failed_elsewhere(self, version: str, since: float) -> str | None:
        """The reason another replica gave for failing `version` at or after `since`, else None."""
        tags = self.client.get_model_version(self.model_name, version).tags or {}
        if tags.get(contract.SERVING_CHECK_TAG) != contract.SERVING_CHECK_FAILED:
            return None
        try:
            at = float(tags.get(SERVING_CHECKED_AT_TAG, "nan"))
        except ValueError:
            return None
        mine = self.last_check is not None and self.last_check.version == version and \
            abs(self.last_check.at - at) < 1e-3
        if mine or not at >= since:
            return None
        return tags.get(contract.SERVING_REASON_TAG, "failed on another replica")

    def poll(self) -> None:
        """One look at the alias: switch to a new champion that passes its check, else roll back."""
        now = time.time()
        version = str(self.client.get_model_version_by_alias(self.model_name, CHAMPION).version)
        serving = self.served
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, self._read_at if self._read_at is not None else now - self.poll_seconds)
        self._read_at = now
        # a failure written since the alias moved to the version: since our previous read of the alias
        moved = self._seen[1]
        if version == serving.version:
            self._rejected = self._rollback_failed = None
            if self.previous is not None and (reason := self._failed_elsewhere(version, serving.since)):
                back = self.previous
                self._serve(Served(back.version, back.model, back.input_schema, back.run_id, time.time(),
                                   back.torch_threads))
                self.previous = None
                self.log(f"{self.model_name} version {version} failed its serving check on another replica "
                         f"({reason}): serving version {back.version} again")
            return
        if version == self._rejected:   # the rollback did not take: again, without a new check
            self._roll_back(version, self.last_check.reason)
            return
        if reason := self._failed_elsewhere(version, moved):
            self._reject(version, f"failed on another replica: {reason}", record=False)
            return
        self.log(f"{self.model_name}: {CHAMPION} is now version {version}; checking it "
                 f"(version {serving.version} keeps serving meanwhile)")
        started = time.monotonic()
        try:
            model, seconds = check_version(self.model_name, version, self.check_seconds,
                                           self.limits.torch_threads)
        except CheckFailed as failure:
            if self._stop.is_set():
                return
            self._record(Check(version, contract.SERVING_CHECK_FAILED, str(failure), time.monotonic() - started,
                               time.time()))
            self._reject(version, str(failure), record=False)
            return
        if self._stop.is_set():
            return
        if reason := self._failed_elsewhere(version, moved):   # another replica failed it meanwhile
            self._reject(version, f"failed on another replica: {reason}", record=False)
            return
        self.previous = serving
        self._serve(self._served(version, model))   # the swap: the next request reads the new model
        self._rejected = self._rollback_failed = None
        self._record(Check(version, contract.SERVING_CHECK_PASSED, self._passed(seconds), seconds, time.time()))
        self.log(f"{self.model_name}: now serving version {version} (checked in {seconds:.1f} s; "
                 f"was version {serving.version})")

    def _reject(self, version: str, reason: str, record: bool) -> None:
        self._rejected = version
        if record or self.last_check is None or self.last_check.version != version:
            self.last_check = Check(version, contract.SERVING_CHECK_FAILED, reason, 0.0, time.time())
        self._roll_back(version, reason)

    def _roll_back(self, failed: str, reason: str) -> None:
        """The alias back to the version serving, unless it moved on again meanwhile; one log line
        (a store that refuses the write, read-only for one, is said once, then retried quietly)."""
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
            if self._rollback_failed == failed:
                return
            self._rollback_failed = failed
            moved = f"{CHAMPION} could not be moved back ({one_line(error)}); retrying quietly at each poll"
        else:
            if self._rollback_failed == failed:
                self._rollback_failed = None
                self.log(f"{self.model_name}: {moved}")
                return
        self.log(f"{self.model_name} version {failed} failed its serving check ({reason}): still serving "
                 f"version {keep}; {moved}")

    def _served(self, version: str, model) -> Served:
        run_id = getattr(model.metadata, "run_id", None)
        since = time.time()   # before the tuning: a failure another replica writes meanwhile counts
        try:
            threads, seconds = tune_threads(model, self.limits.torch_threads)
        except Exception as error:  # noqa: BLE001 (it passed its check: serve it on the default count)
            threads, seconds = None, {}
            self.log(f"{self.model_name} version {version}: could not time its torch threads ({one_line(error)}); "
                     f"drawing with {self.limits.torch_threads}")
        if seconds:
            self.log(f"{self.model_name} version {version}: drawing with {threads} torch thread(s) ("
                     + ", ".join(f"{n}: {s * 1000:.0f} ms" for n, s in seconds.items()) + " for the check request)")
        return Served(version, model, model.metadata.get_input_schema(), run_id, since, threads)

    def _serve(self, served: Served) -> None:
        install_drawer(served, self.drawer)
        self.served = served
        self.metrics.serving(self.model_name, served.version)

    def _passed(self, seconds: float) -> str:
        return f"drew {CHECK_IMAGES} images in {seconds:.1f} s (load included)"

    def _record(self, check: Check) -> None:
        """Keep the check for /version and write it on the version (the store may fail: logged)."""
        self.last_check = check
        self.metrics.checks.labels(check.result).inc()
        try:
            # the result last: a replica that reads it finds its time and reason already there
            for key, value in ((SERVING_CHECKED_AT_TAG, f"{check.at:.3f}"),
                               (contract.SERVING_REASON_TAG, one_line(check.reason)[:REASON_CHARS]),
                               (contract.SERVING_CHECK_TAG, check.result)):
                self.client.set_model_version_tag(self.model_name, check.version, key, value)
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
                "limits": asdict(self.limits),
                "mlflow_version": mlflow.__version__}


def serve(model_name: str = contract.DEFAULT_MODEL_NAME, port: int = DEFAULT_PORT,
          poll_seconds: float = DEFAULT_POLL_SECONDS, check_seconds: float = DEFAULT_CHECK_SECONDS,
          log: Callable[[str], None] = print, host: str = HOST, limits: Limits | None = None,
          token: str | None = None, reuse_port: bool = False) -> dict:
    """Serve models:/<model_name>@champion on <host>:<port> in this thread until interrupted
    (KeyboardInterrupt, Prefect's TerminationSignal: re-raised after the server is closed
    gracefully). ServeError before anything starts."""
    server = ChampionServer(model_name, port, poll_seconds, check_seconds, host=host, log=log, limits=limits,
                            token=token, reuse_port=reuse_port).open()
    log(f"serving models:/{model_name}@{CHAMPION} (version {server.served.version}) on {server.url}"
        f"{' (token required)' if token else ''}; following the alias every {server.poll_seconds:g} s; "
        f"at most {server.limits.max_queue} requests in flight, batches of up to "
        f"{server.limits.max_batch_images} images")
    try:
        server.serve_forever()
    finally:
        log(f"stopped serving {model_name} (version {server.served.version} was serving)")
    return server.status()

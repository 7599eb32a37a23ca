"""The HTTP side of `ddpm serve`: MLflow's scoring protocol on uvicorn, with bounds, batches and metrics.

    make_app      the ASGI (FastAPI) application: /invocations, /ping, /health, /version, /metrics
    Drawer        the bounded queue and the drawing threads (dynamic batching)
    Limits        the documented bounds (queue, batch, body size, times)
    Metrics       Prometheus metrics of one server (its own registry)

The engine is the one `mlflow models serve` runs: uvicorn serving a FastAPI application, and every
`POST /invocations` goes through `mlflow.pyfunc.scoring_server.invocations`, MLflow's own parsing,
schema enforcement and JSON answer. What this adds:

- **Bounded, honest overload.** At most `Limits.max_queue` requests are admitted at once (drawing or
  waiting); one more is answered at once with 503 and `Retry-After` (never a reset, never an
  unbounded queue). A request still waiting after `Limits.request_seconds` is answered 503 as well;
  one drawing past it, 504 (and its drawing stops).
- **The drawing threads.** Requests are drawn by `Limits.draw_threads` long-lived threads (default
  1), never in the thread a request arrived on: PyTorch's OpenMP pool belongs to the thread that
  uses it, and a thread per request had each one spin up its own (0.6 CPU-s per request on a busy
  machine). A batch is drawn with the torch thread count its version was tuned to when it was
  checked (champion_server.tune_threads: 1 or cores / draw_threads, whichever drew the check
  request faster): a small network's per-image work is too small to split over cores (tiny-16,
  10 DDIM steps, in one thread: 24 / 48 / 108 ms for 1 / 4 / 16 images; in two: 51 / 107 / 176 ms,
  and 81 / 166 / 217 ms with OMP_WAIT_POLICY=PASSIVE); a large network's is not.
- **Dynamic batching.** Requests waiting for the same version with the same sampler, steps, eta and
  guidance are drawn together, up to `Limits.max_batch_images` images, each getting the images it
  would get alone (the served model's `prepare`/`draw`; versions registered before them are drawn
  one request at a time).
- **A client that went away stops drawing**: it is dropped from the queue, and a batch whose
  clients have all gone stops between two sampler steps.
- **Auth.** With a token, every endpoint but /ping and /health needs `Authorization: Bearer <token>`.
- **No stack traces in bodies**: a model's error keeps its status and JSON body minus MLflow's
  `stack_trace` and the request echo; anything unexpected is a 500 saying so, the trace in the log.
- **Metrics and an access log**: /metrics in Prometheus' text format; one JSON line per request on
  the logger `ddpm.serve.access`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Request   # at module level: the routes' annotations are resolved in this module
from mlflow.exceptions import MlflowException

from ddpm.machine import usable_cores


ACCESS_LOGGER = "ddpm.serve.access"
MESSAGE_CHARS = 1000   # an error message in a body, one line (MLflow's echo the whole request back)
log = logging.getLogger("ddpm.serve")


@dataclass(frozen=True)
class Limits:
    """The server's documented bounds (docs/serving.md, "Load, limits and stopping")."""

    max_queue: int = 64              # requests admitted at once, drawing or waiting; the next: 503 + Retry-After
    max_batch_images: int = 64       # images drawn together in one batch (requests are never split)
    draw_threads: int = 1            # batches drawn at once (each on at most cores / draw_threads torch threads)
    request_seconds: float = 60.0    # from arrival to answer: waiting past it 503, drawing past it 504
    max_body_bytes: int = 1 << 20    # a request body (one record and its params); larger: 413
    body_seconds: float = 30.0       # to send the body; slower: 408
    stop_seconds: float = 30.0       # at SIGTERM, admitted requests are finished within this, then cancelled (503)

    def __post_init__(self):
        for name in ("max_queue", "max_batch_images", "draw_threads", "max_body_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_seconds", "body_seconds", "stop_seconds"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")

    @property
    def torch_threads(self) -> int:
        """The torch threads one drawing thread may use: its share of the usable cores."""
        return max(1, usable_cores() // self.draw_threads)


class Refused(Exception):
    """A request not drawn (the server stopping, the client gone, too long waiting): HTTP status + line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- metrics ----------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (several servers in a process,
    tests included, do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ddpm_serve_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=registry)
        self.latency = Histogram("ddpm_serve_request_seconds", "time from a request's arrival to its answer",
                                 ["path"], registry=registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("ddpm_serve_images", "images drawn and answered", registry=registry)
        self.batches = Histogram("ddpm_serve_batch_requests", "requests drawn together in one batch",
                                 registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.in_flight = Gauge("ddpm_serve_requests_in_flight", "requests admitted, drawing or waiting",
                               registry=registry)
        self.queue_limit = Gauge("ddpm_serve_queue_limit", "the bound on requests in flight", registry=registry)
        self.version = Gauge("ddpm_serve_version_info", "the registered version serving (1 on its label set)",
                             ["model_name", "version"], registry=registry)
        self.checks = Counter("ddpm_serve_checks", "serving checks of new champions, by result", ["result"],
                              registry=registry)

    def serving(self, model_name: str, version: str) -> None:
        self.version.clear()
        self.version.labels(model_name, version).set(1)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- the drawing threads and their queue -----------------------------------------------------------

# set in the thread that runs MLflow's `invocations` for one request: where the served model's
# predict hands its validated request (see install_drawer)
_CURRENT_JOB: contextvars.ContextVar["Job | None"] = contextvars.ContextVar("ddpm_serve_job", default=None)


class Job:
    """One admitted request's drawing: what to draw (a prepared Draw, or a call), its result."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.served = None         # the Served it was parsed against (batches never mix versions)
        self.draw = None           # a served model's Draw (batchable), or None
        self.call: Callable[[], Any] | None = None   # a model without prepare/draw: its own predict
        self.images = 0
        self.cancelled: str | None = None   # why it should not be drawn / should stop
        self.status: int | None = None      # the status a cancelled job answers
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def cancel(self, status: int, reason: str) -> None:
        if self.cancelled is None:
            self.cancelled, self.status = reason, status

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def wait(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class Drawer:
    """The bounded queue of jobs and the threads that draw them, batching compatible ones."""

    def __init__(self, limits: Limits, metrics: Metrics):
        self.limits, self.metrics = limits, metrics
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.drawing = 0
        self.closed = False
        self.seconds_per_image = 0.05   # a running mean, for Retry-After
        self.threads = [threading.Thread(target=self._run, name=f"draw-{i}", daemon=True)
                        for i in range(limits.draw_threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job):
        """From a request's thread: queue the job and wait for its result."""
        with self.cond:
            if self.closed:
                raise Refused(503, "the server is stopping")
            self.pending.append(job)
            self.cond.notify()
        return job.wait()

    def retry_after(self, queued: int) -> int:
        """Seconds after which a refused client may find room: the queue ahead of it drawn."""
        per_batch = max(1, self.limits.max_batch_images) * self.seconds_per_image
        batches = math.ceil(max(1, queued) / self.limits.max_batch_images)
        return max(1, math.ceil(batches * per_batch / self.limits.draw_threads))

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the waiting ones that can share its batch."""
        with self.cond:
            while True:
                now = time.monotonic()
                for job in list(self.pending):   # gone or out of time while waiting: never drawn
                    if job.cancelled is None and now > job.deadline:
                        job.cancel(503, f"waited over {self.limits.request_seconds:g} s for its turn")
                    if job.cancelled is not None:
                        self.pending.remove(job)
                        job.finish(error=Refused(job.status, job.cancelled))
                if self.pending:
                    break
                if self.closed:
                    return None
                self.cond.wait(0.5)
            first = self.pending.popleft()
            batch, images = [first], first.images
            if first.draw is not None:
                for job in list(self.pending):
                    if (job.served is first.served and job.draw is not None and job.draw.key == first.draw.key
                            and images + job.images <= self.limits.max_batch_images):
                        self.pending.remove(job)
                        batch.append(job)
                        images += job.images
            self.drawing += 1
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            try:
                self._draw(batch)
            finally:
                with self.cond:
                    self.drawing -= 1
                    self.cond.notify_all()
            images = sum(job.images for job in batch)
            if images:
                self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * (time.monotonic() - started) / images

    def _draw(self, batch: list[Job]) -> None:
        def steps(iterable):
            for step in iterable:   # between two sampler steps: stop when nobody waits any more
                now = time.monotonic()
                for job in batch:
                    if job.cancelled is None and now > job.deadline:
                        job.cancel(504, f"not drawn within {self.limits.request_seconds:g} s")
                if all(job.cancelled is not None for job in batch):
                    raise Refused(batch[0].status, batch[0].cancelled)
                yield step

        self.metrics.batches.observe(len(batch))
        import torch

        # the version's tuned thread count (a per-thread setting: this drawing thread only)
        threads = getattr(batch[0].served, "torch_threads", None) or self.limits.torch_threads
        if torch.get_num_threads() != threads:   # a change also empties oneDNN's kernel cache: only when it is one
            torch.set_num_threads(threads)
        try:
            if batch[0].draw is not None:
                inner = batch[0].served.model.unwrap_python_model()
                results = inner.draw([job.draw for job in batch], progress=steps)
            else:
                results = [batch[0].call()]
        except Refused:
            for job in batch:
                job.finish(error=Refused(job.status, job.cancelled))
            return
        except BaseException as error:  # noqa: BLE001 (the request answers it)
            for job in batch:
                job.finish(error=error)
            return
        for job, result in zip(batch, results):
            if isinstance(result, BaseException):
                job.finish(error=result)
            else:
                job.finish(result=result)

    def close(self, stop_seconds: float, admitted=lambda: 0) -> None:
        """Finish what is admitted within stop_seconds, cancel the rest (503), join the threads.
        `admitted()`: requests the server admitted and has not answered yet; one still parsing its
        body when the stop came reaches the queue after it, and is drawn too (it was accepted)."""
        deadline = time.monotonic() + stop_seconds
        with self.cond:
            while (self.pending or self.drawing or admitted() > 0) and time.monotonic() < deadline:
                self.cond.wait(0.1)
            self.closed = True
            for job in self.pending:
                job.cancel(503, "the server stopped before drawing it")
            self.cond.notify_all()
        for thread in self.threads:   # a drawing batch sees its jobs cancelled at its next step
            thread.join(timeout=stop_seconds + 5)


def install_drawer(served, drawer: Drawer) -> None:
    """Route the served model's predict through `drawer`: MLflow's invocations() parses and enforces
    the request in the request's thread, then the model's predict hands the validated request (its
    prepare()) to the drawing threads, which batch it with others. Without a current job (a call
    outside a request) predict is the model's own."""
    try:
        inner = served.model.unwrap_python_model()
    except Exception:  # noqa: BLE001 (not a PythonModel: drawn in the request's thread, unbatched)
        return
    own = type(inner).predict.__get__(inner)
    batchable = callable(getattr(inner, "prepare", None)) and callable(getattr(inner, "draw", None))

    def predict(context, model_input, params=None):
        job = _CURRENT_JOB.get()
        if job is None:
            return own(context, model_input, params)
        job.served = served
        if batchable:
            job.draw = inner.prepare(model_input, params)   # HTTP 400 here, before it waits
            job.images = job.draw.num_images
        else:
            job.call = lambda: own(context, model_input, params)
        return drawer.submit(job)

    inner.predict = predict


# --- the application -------------------------------------------------------------------------------


def clean_error_body(error: MlflowException) -> bytes:
    """MLflow's error body without its stack trace and without the request echoed back
    ("Failed to predict data '<the whole frame>'. Error: ..."): the error, one line."""
    body = json.loads(error.serialize_as_json())
    body.pop("stack_trace", None)
    message = str(body.get("message", ""))
    if message.startswith("Failed to predict data") and "Error: " in message:
        message = message.split("Error: ", 1)[1]
    message = " ".join(message.split())
    body["message"] = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "..."
    return json.dumps(body).encode()


def make_app(server, limits: Limits, metrics: Metrics, drawer: Drawer, token: str | None = None):
    """The FastAPI application of a ChampionServer (`server.served`, `server.status()`)."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from mlflow.pyfunc.scoring_server import CONTENT_TYPE_CSV, invocations

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    access = logging.getLogger(ACCESS_LOGGER)
    # A thread per admitted request: each parses, then waits in the model's predict for its batch.
    # asyncio's default executor has cores + 4 threads: 6 here, so 64 clients reached the drawer
    # 6 at a time and batches never grew past 6.
    requests_pool = concurrent.futures.ThreadPoolExecutor(limits.max_queue, thread_name_prefix="request")
    app.state.requests_pool = requests_pool
    state = {"in_flight": 0, "stopping": False}
    app.state.admission = state
    metrics.queue_limit.set(limits.max_queue)

    def answer(status: int, payload: Any, headers: dict | None = None, media: str = "application/json"):
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        return Response(body, status_code=status, media_type=media, headers=headers)

    def error(status: int, code: str, message: str, headers: dict | None = None):
        return answer(status, {"error_code": code, "message": message}, headers)

    def overloaded(message: str):
        retry = drawer.retry_after(state["in_flight"])
        return error(503, "TEMPORARILY_UNAVAILABLE", message, {"Retry-After": str(retry)})

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.monotonic()
        path = request.url.path
        known = path if path in ("/invocations", "/ping", "/health", "/version", "/metrics") else "other"
        if token is not None and path not in ("/ping", "/health"):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                response = error(401, "UNAUTHENTICATED", "send the server's token: Authorization: Bearer <token>",
                                 {"WWW-Authenticate": "Bearer"})
                return finish(request, response, known, started)
        try:
            response = await call_next(request)
        except Exception as failure:  # noqa: BLE001 (never a trace in the body)
            log.error("%s %s failed", request.method, path, exc_info=failure)
            response = error(500, "INTERNAL_ERROR", "the server failed to answer this request (see its log)")
        return finish(request, response, known, started)

    def finish(request, response, known: str, started: float):
        seconds = time.monotonic() - started
        metrics.requests.labels(known, str(response.status_code)).inc()
        metrics.latency.labels(known).observe(seconds)
        if access.isEnabledFor(logging.INFO):
            served = server.served
            access.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "client": request.client.host
                if request.client else None, "method": request.method, "path": request.url.path,
                "status": response.status_code, "seconds": round(seconds, 4),
                "version": served.version if served else None,
                "images": getattr(request.state, "images", 0)}))
        return response

    @app.get("/ping")
    @app.get("/health")
    async def ping():
        return answer(200 if server.served is not None and not state["stopping"] else 503, "\n")

    @app.get("/version")
    async def version():
        return answer(200, server.status())

    @app.get("/metrics")
    async def prometheus():
        body, media = metrics.text()
        return Response(body, media_type=media)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise Refused(413, f"a request body is at most {limits.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise Refused(413, f"a request body is at most {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/invocations")
    async def invoke(request: Request):
        if state["stopping"]:
            return overloaded("the server is stopping; retry on another replica")
        if state["in_flight"] >= limits.max_queue:
            return overloaded(f"the server is at its bound of {limits.max_queue} requests drawing or waiting; "
                              "retry after the Retry-After seconds")
        state["in_flight"] += 1
        metrics.in_flight.set(state["in_flight"])
        job = Job(time.monotonic() + limits.request_seconds)
        try:
            try:
                data = await asyncio.wait_for(read_body(request), limits.body_seconds)
            except asyncio.TimeoutError:
                return error(408, "REQUEST_TIMEOUT", f"send the request body within {limits.body_seconds:g} s")
            except Refused as refused:
                return error(refused.status, "REQUEST_TOO_LARGE", str(refused))
            served = server.served   # read once: this request's version, whatever swaps meanwhile
            content_type = request.headers.get("content-type", "")
            # MLflow reads CSV with the signature's pandas types, and `Any` has none (every CSV
            # request was a 400): CSV is read as pandas reads it, the model checks the values
            schema = None if content_type.split(";")[0].strip() == CONTENT_TYPE_CSV else served.input_schema

            def run():
                _CURRENT_JOB.set(job)
                return invocations(data, content_type, served.model, schema)

            try:
                work = asyncio.get_running_loop().run_in_executor(requests_pool, contextvars.copy_context().run, run)
            except RuntimeError:   # the pool was shut down: the server is stopping
                return overloaded("the server is stopping; retry on another replica")
            gone = asyncio.ensure_future(disconnected(request))
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:   # the client went away: stop drawing for it, answer nobody
                job.cancel(499, "the client closed the connection")
                try:
                    await work
                except Exception:  # noqa: BLE001
                    pass
                return answer(499, {"error_code": "CLIENT_CLOSED", "message": "the client went away"})
            gone.cancel()
            try:
                result = work.result()
            except MlflowException as failure:
                cause = failure.__cause__ or failure.__context__
                if isinstance(cause, Refused):
                    return refusal(cause)
                return answer(failure.get_http_status_code(), clean_error_body(failure))
            except Refused as refused:
                return refusal(refused)
            except RecursionError:
                return error(400, "BAD_REQUEST", "the JSON body is nested too deeply")
            if result.status == 200:
                request.state.images = job.images
                metrics.images.inc(job.images)
            return answer(result.status, result.response, media=result.mimetype)
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.set(state["in_flight"])

    def refusal(refused: Refused):
        if refused.status == 503:
            return overloaded(str(refused))
        code = {504: "DEADLINE_EXCEEDED", 499: "CLIENT_CLOSED"}.get(refused.status, "TEMPORARILY_UNAVAILABLE")
        return error(refused.status, code, str(refused))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def elsewhere(path: str):
        return error(404, "ENDPOINT_NOT_FOUND", f"no /{path} here: POST /invocations, GET /ping, /health, "
                                               "/version, /metrics")

    return app


async def disconnected(request) -> None:
    """Returns when the client closes its connection (the ASGI server's http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

"""`ddpm serve` beside `mlflow models serve --workers 2`, on the same registered model and requests.

    .venv/bin/python benchmarks/serving.py                 # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/serving.py --seconds 5 --levels 1 16

A registered model of the pipeline's default architecture (tiny-16, T=1000; one training step:
timing does not depend on the weights) in a temporary sqlite store. Each server is started alone,
then loaded by closed-loop clients (keep-alive connections, one request at a time each: 1 image,
10 DDIM steps, a seed per request) at 1, 4, 16 and 64 clients for --seconds each, after a warm-up.
Printed per server and level: requests/s and images/s, p50/p95/p99 latency of the answered
requests, and the answers by status (conn = a reset or refused connection). A 503 is answered
with Retry-After; the client waits that long (at most 1 s) before its next request.

Then the champion switch: 16 clients on `ddpm serve` while the alias moves to version 2; every
request must be answered 200, and /version must say 2 at the end.

Load tests only ever target 127.0.0.1. Run it on a quiet machine (the first figure of
/proc/loadavg below ~0.7, no training or test run): it prints the load before and after each part.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "bench"
PARAMS = {"sampler": "ddim", "steps": 10, "eta": 0.0}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_store(tmp: Path) -> str:
    """A store with two registered versions of the default architecture; champion = 1."""
    import torch

    from ddpm.diffusion import DiffusionConfig
    from ddpm.training import TrainConfig, Trainer
    from ddpm.unet import preset

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["DDPM_HOME"] = str(tmp / "home")
    from tasks import tracking
    from tasks.serving import log_ddpm_model

    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("bench-serving")).info.run_id
    for seed in (0, 1):
        config = TrainConfig(steps=1, batch_size=4, warmup_steps=0, log_every=1, checkpoint_every=1,
                             device="cpu", seed=seed)
        batches = lambda i: torch.rand(4, 1, 16, 16) * 2 - 1  # noqa: E731
        checkpoint = Trainer(preset("tiny-16"), DiffusionConfig(), config, batches,
                             tmp / f"ckpt{seed}").train(progress=False).checkpoints[-1]
        log_ddpm_model(run_id, checkpoint, registered_model_name=NAME)
    client.set_registered_model_alias(NAME, "champion", "1")
    return uri


def start(command: list[str], port: int, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    stop(process)
    raise SystemExit(f"{command} did not answer /ping within 180 s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def load(port: int, clients: int, seconds: float, warmup: float = 2.0) -> dict:
    """Closed-loop clients for warmup + seconds; the figures of the last `seconds`."""
    records: list[tuple[float, float, object]] = []   # (sent, latency, status or "conn")
    lock = threading.Lock()
    begin = time.monotonic()
    measure_from, until = begin + warmup, begin + warmup + seconds

    def client(index: int):
        connection = None
        i = 0
        while time.monotonic() < until:
            body = json.dumps({"dataframe_records": [{"num_images": 1}],
                               "params": {**PARAMS, "seed": index * 100_000 + i}})
            i += 1
            sent = time.monotonic()
            retry = 0.0
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status: object = response.status
                if status == 503:
                    retry = min(1.0, float(response.getheader("Retry-After") or 1))
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                status = "conn"
                if connection is not None:
                    connection.close()
                connection = None
                retry = 0.1
            done = time.monotonic()
            if sent >= measure_from and done <= until:
                with lock:
                    records.append((sent, done - sent, status))
            if retry:
                time.sleep(retry)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = sorted(latency for _, latency, status in records if status == 200)
    by_status: dict[str, int] = {}
    for *_, status in records:
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    def quantile(q: float) -> float | None:
        return round(ok[min(len(ok) - 1, int(q * len(ok)))] * 1000, 1) if ok else None

    return {"clients": clients, "req_s": round(len(ok) / seconds, 2), "img_s": round(len(ok) / seconds, 2),
            "p50_ms": quantile(0.50), "p95_ms": quantile(0.95), "p99_ms": quantile(0.99), "status": by_status}


def switch_under_load(port: int, clients: int, seconds: float) -> dict:
    """Move the alias to version 2 while `clients` clients send requests; every answer counted."""
    from mlflow import MlflowClient

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(load(port, clients, seconds, warmup=0.5)))
    runner.start()
    time.sleep(2.0)
    MlflowClient().set_registered_model_alias(NAME, "champion", "2")
    runner.join()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/version")
    result["version_after"] = json.loads(connection.getresponse().read())["version"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level (default 8)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serving.json")
    parser.add_argument("--serve-args", default="", help="more arguments of ddpm serve, e.g. '--draw-threads 1'")
    parser.add_argument("--only", choices=["ddpm", "mlflow"], help="one server only")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    uri = make_store(tmp)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "DDPM_HOME": str(tmp / "home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DO_NOT_TRACK": "true"}
    servers = {
        "ddpm serve": lambda port: [str(bin_dir / "python"), "-m", "flows.cli", "serve", "--model-name", NAME,
                                    "--port", str(port), "--poll-seconds", "1", "--access-log", "off",
                                    *args.serve_args.split()],
        "mlflow models serve --workers 2": lambda port: [
            str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "--workers", "2"],
    }
    if args.only:
        servers = {name: command for name, command in servers.items() if name.startswith(args.only)}
    results: dict = {"levels": {}, "load": {}, "serve_args": args.serve_args}
    for name, command in servers.items():
        port = free_port()
        process = start(command(port), port, env, tmp / f"{name.split()[0]}.log")
        try:
            time.sleep(2)
            results["load"][f"{name} before"] = loadavg()
            for clients in args.levels:
                row = load(port, clients, args.seconds)
                results["levels"].setdefault(clients, {})[name] = row
                print(f"{name:32} {clients:3} clients: {row['req_s']:7.2f} req/s {row['img_s']:7.2f} img/s "
                      f"p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms {row['status']}", flush=True)
            results["load"][f"{name} after"] = loadavg()
            if name == "ddpm serve":
                results["switch"] = switch_under_load(port, 16, max(args.seconds, 10.0))
                print(f"champion switch under 16 clients: {results['switch']}", flush=True)
        finally:
            stop(process)

    print(f"\n1 image, {PARAMS['steps']} DDIM steps per request; {args.seconds:g} s per level; "
          f"load average: {results['load']}")
    names = list(servers)
    print(f"{'clients':>7} | " + " | ".join(f"{n:^58}" for n in names))
    print(f"{'':>7} | " + " | ".join(f"{'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7}  {'statuses':<25}" for _ in names))
    for clients, row in results["levels"].items():
        cells = []
        for n in names:
            r = row[n]
            cells.append(f"{r['req_s']:7.2f} {r['p50_ms']!s:>7} {r['p95_ms']!s:>7} {r['p99_ms']!s:>7}  "
                         f"{json.dumps(r['status']):<25}")
        print(f"{clients:>7} | " + " | ".join(cells))
    switch = results.get("switch")
    if switch:
        failed = sum(count for status, count in switch["status"].items() if status != "200")
        print(f"champion switch 1 -> 2 under 16 clients: {sum(switch['status'].values())} requests, {failed} not 200, "
              f"serving version {switch['version_after']} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""Hosts that share only the servers: a team stack (scripts/stack.sh start --team: PostgreSQL behind
an MLflow tracking server with proxied artifacts and behind the Prefect server), and "hosts" that
are separate working folders and DDPM_HOMEs with nothing but the two URLs. Each host's folder is
deleted before the next one acts, as a reclaimed spot instance's disk is.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow   # real PostgreSQL, MLflow and Prefect servers, CLI trainings

REPO = Path(__file__).resolve().parents[1]
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
TINY = ["--max-images", "400", "--num-samples", "32", "--fid-extractor", "classifier",
        "--set", "train.checkpoint_every=10", "--set", "train.log_every=10", "--set", "train.keep_last=2",
        "--set", "train.progress_images=0"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Team:
    """The team stack's URLs, and hosts that know only them."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.tracking_uri = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        self.prefect_api = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        self.client = MlflowClient(self.tracking_uri)

    def host(self, name: str) -> dict:
        """A fresh host: its own working folder and DDPM_HOME, the servers' URLs, nothing else shared."""
        folder = self.root / name
        folder.mkdir()
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("DDPM_", "MLFLOW_", "PREFECT_", "PG"))}
        return {**env, "DDPM_HOME": str(folder / "home"), "MLFLOW_TRACKING_URI": self.tracking_uri,
                "PREFECT_API_URL": self.prefect_api, "PREFECT_HOME": str(folder / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO), "HOST_FOLDER": str(folder)}

    @staticmethod
    def reclaim(host: dict) -> None:
        """The instance is gone, and its disk with it."""
        shutil.rmtree(host["HOST_FOLDER"])


def ddpm(host: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=host, cwd=host["HOST_FOLDER"],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"ddpm {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stack(env: dict, *args: str) -> str:
    result = subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"stack.sh {args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def team():
    if not PG_BINS:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin)")
    pytest.importorskip("psycopg2", reason="the team extra (psycopg2) is not installed")
    # the cluster belongs to the user postgres when run as root: it must reach the folder
    root = Path(tempfile.mkdtemp(prefix="ddpm-team-"))
    root.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "PG"))},
           "PYTHON_BIN": sys.executable, "DDPM_HOME": str(root / "stack-home"), "PG_DATA": str(root / "postgres"),
           "PG_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()), "PREFECT_PORT": str(free_port()),
           "PREFECT_HOME": str(root / "stack-prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    try:
        started = stack(env, "start", "--team")
        assert "every host: export MLFLOW_TRACKING_URI=http://127.0.0.1:" in started
        yield Team(root, env)
    finally:
        stack(env, "stop")
        shutil.rmtree(root, ignore_errors=True)


def stored_files(client: MlflowClient, run_id: str, folder: str = "checkpoints") -> list[str]:
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, folder) if not f.is_dir)


def test_the_team_stack_keeps_both_servers_on_postgresql_and_no_password_in_sight(team):
    psql = PG_BINS[-1].parent / "psql"
    home = Path(team.env["DDPM_HOME"])
    env = {**os.environ, "PGPASSFILE": str(home / "stack" / "pgpass")}
    for database, table in (("mlflow", "experiments"), ("prefect", "flow_run")):
        result = subprocess.run([str(psql), "-h", "127.0.0.1", "-p", team.env["PG_PORT"], "-U", "ddpm", "-d", database,
                                 "-tAc", f"SELECT to_regclass('public.{table}') IS NOT NULL"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == "t", result.stderr
    assert oct((home / "stack" / "pgpass").stat().st_mode & 0o777) == "0o600"
    password = (home / "stack" / "pgpass").read_text().strip().rsplit(":", 1)[1]
    for log in (home / "stack").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log
    assert "running" in stack(team.env, "status").splitlines()[-1]   # postgres


def test_a_second_host_evaluates_promotes_samples_serves_and_retrains_what_the_first_trained(team):
    from test_retrain import write_digits

    client = team.client
    source = team.root / "incoming"
    write_digits(source, range(0, 400))

    # host A trains, then disappears
    a = team.host("a")
    trained = ddpm(a, "train", "--experiment", "team", "--source", f"folder:{source}", "--steps", "30", *TINY)
    experiment = client.get_experiment_by_name("team")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")   # the server's store, not A's disk
    [run] = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run_id in trained.stdout and run.info.status == "FINISHED"
    assert run.data.tags["checkpoints.stored"] == "20,30"   # keep_last 2 holds in the store too
    assert stored_files(client, run_id) == ["step-0000020.pt", "step-0000020.pt.sha256",
                                            "step-0000030.pt", "step-0000030.pt.sha256"]
    assert run.data.metrics["checkpoints.published_mib"] > 0
    datasets = client.search_runs([client.get_experiment_by_name("ddpm-datasets").experiment_id])
    assert [d.data.tags["dataset.fingerprint"] for d in datasets] == [run.data.tags["dataset.fingerprint"]]
    team.reclaim(a)

    # host B cannot reach the source folder either: the data comes from the store, by fingerprint
    away = source.rename(team.root / "elsewhere")
    b = team.host("b")
    ddpm(b, "evaluate", "--run-id", run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "fid_classifier")) == [20, 30, 30]
    promoted = ddpm(b, "promote", "--experiment", "team")
    assert '"moved": true' in promoted.stdout
    champion = client.get_model_version_by_alias("ddpm", "champion")
    assert champion.run_id == run_id
    ddpm(b, "sample", "--model", "models:/ddpm@champion", "--num-images", "4", "--out", str(Path(b["HOST_FOLDER"]) / "s"))
    assert len(list((Path(b["HOST_FOLDER"]) / "s").glob("image-*.png"))) == 4
    team.reclaim(b)
    away.rename(source)

    # host C serves the champion, then runs the night's retrain on new data: a warm start from the
    # champion A trained, which then meets it head-to-head
    c = team.host("c")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port)], env=c,
                              cwd=c["HOST_FOLDER"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as response:
                    assert json.loads(response.read())["version"] == champion.version
                    break
            except OSError:
                assert time.monotonic() < deadline, "the champion server did not answer"
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"num_images": 1}], "params": {"steps": 2}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    write_digits(source, range(400, 480))   # the night's new images
    ddpm(c, "retrain", "--experiment", "team")
    [retrained] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id != run_id]
    tags = retrained.data.tags
    assert tags["retrain.decision"] == "warm-start", tags.get("retrain.reason")
    assert tags["retrain.champion_version"] == champion.version
    assert retrained.info.status == "FINISHED" and tags["checkpoints.stored"] == "20,30"
    assert "promotion.head_to_head.challenger_fid" in tags   # the champion re-scored on C, from the store


def test_a_run_killed_on_one_host_resumes_on_another_and_ends_on_the_uninterrupted_weights(team, tmp_path):
    from ddpm.checkpoint import list_checkpoints
    from ddpm.training import TrainConfig
    from trained_runs import assert_equals_uninterrupted

    client = team.client
    a = team.host("resume-a")
    train = ["train", "--experiment", "spot", "--source", "digits", "--steps", "60", *TINY,
             "--set", "train.posthoc_ema=true"]
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *train], env=a, cwd=a["HOST_FOLDER"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while True:   # until a checkpoint has reached the store
            assert process.poll() is None, "training ended before a checkpoint reached the store"
            assert time.monotonic() < deadline, "no checkpoint reached the store within 300 s"
            experiment = client.get_experiment_by_name("spot")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and (run_id := runs[0].info.run_id) and "step-0000010.pt.sha256" in stored_files(client, run_id):
                break
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)   # the spot instance is reclaimed
        process.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"
    team.reclaim(a)

    b = team.host("resume-b")
    ddpm(b, "train", "--resume", run_id, "--force")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 60
    folder = Path(b["DDPM_HOME"]) / "runs" / run_id / "checkpoints"
    assert run.data.tags["checkpoint_dir"] == str(folder)
    assert [p.name for p in list_checkpoints(folder)][-1] == "step-0000060.pt"
    # every post-hoc EMA snapshot is in the store: A's, then B's
    snapshots = [n for n in stored_files(client, run_id, "checkpoints/posthoc-ema") if n.endswith(".pt")]
    config = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path))).read_text())
    assert len(snapshots) == TrainConfig(**config["train"]).posthoc_ema_snapshot_count
    assert_equals_uninterrupted(client, run_id, Path(b["DDPM_HOME"]), folder, tmp_path, steps=60)


def test_deployments_on_the_team_stack_train_evaluate_and_promote_on_a_worker_with_its_own_home(team):
    """The PostgreSQL-backed Prefect server and the stack's process worker: the deployer's DDPM_HOME
    is not the flow runs' (DDPM_JOB_HOME, a folder on the worker's host), and is gone before the
    runs start; the training's completion triggers evaluate; promote registers the run."""
    from test_deployments import TINY_PARAMETERS, prefect, read_flow_runs, script

    deployer = team.host("deployer")
    job_home = team.root / "worker-home"
    env = {**deployer, "PYTHON_BIN": sys.executable, "PREFECT_PORT": team.env["PREFECT_PORT"],
           "DDPM_JOB_HOME": str(job_home)}
    deployed = script("deploy.sh", env=env)
    assert "train_pipeline/train" in deployed and "promote/promote" in deployed
    team.reclaim(deployer)
    env["HOST_FOLDER"] = str(team.root)

    parameters = {**TINY_PARAMETERS, "experiment": "deployed"}
    out = prefect(["deployment", "run", "train_pipeline/train", "--params", json.dumps(parameters)], env)
    train_run = next(line.split("UUID:")[-1].strip() for line in out.splitlines() if "UUID" in line)
    worker_log = Path(team.env["DDPM_HOME"]) / "stack" / "worker.log"
    deadline = time.monotonic() + 420
    while True:
        runs = [r for r in read_flow_runs(env, "evaluate")
                if r["parameters"].get("prefect_flow_run_id") == f"prefect.flow-run.{train_run}"]
        if runs and runs[0]["state"] in ("COMPLETED", "FAILED", "CRASHED"):
            break
        trains = [r for r in read_flow_runs(env, "train_pipeline") if r["id"] == train_run]
        assert not trains or trains[0]["state"] not in ("FAILED", "CRASHED"), worker_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no evaluate run completed in time:\n" + worker_log.read_text()[-3000:]
        time.sleep(5)
    assert runs[0]["state"] == "COMPLETED", worker_log.read_text()[-3000:]

    out = prefect(["deployment", "run", "promote/promote", "--params",
                   json.dumps({"config": {"experiments": ["deployed"], "model_name": "deployed-model"}}),
                   "--watch"], env)
    client = team.client
    [run] = client.search_runs([client.get_experiment_by_name("deployed").experiment_id])
    assert run.data.tags["prefect.flow_run_id"] == train_run and "evaluate.flow_run_id" in run.data.tags
    assert run.data.tags["checkpoint_dir"].startswith(str(job_home))   # trained in the worker's own home
    assert client.get_model_version_by_alias("deployed-model", "champion").run_id == run.info.run_id


def test_an_artifact_store_that_fills_mid_run_costs_a_warning_not_the_run(tmp_path):
    """Training goes on while the store is full (one warning line per checkpoint that did not reach
    it, no traceback), uploads resume once there is space, and the run records exactly the
    checkpoints the store holds (keep_last of them)."""
    import threading

    from test_disk_full import TRAIN, fill, small_disk

    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(home), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "DDPM_PUBLISH_CHECKPOINTS": "on"}
    with small_disk(home / "mlartifacts", "64m") as store:
        process = subprocess.Popen([sys.executable, "-m", "flows.cli", *TRAIN, "--experiment", "full-store"],
                                   env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 300
        while not list(store.glob("*/*/artifacts/checkpoints/step-0000010.pt.sha256")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint reached the store"
            time.sleep(0.05)
        filler = fill(store)   # another program fills the store's disk
        while not any("did not reach the artifact store" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        filler.unlink()        # ... and frees it again
        assert process.wait(timeout=300) == 0, "".join(lines)[-3000:]
        reader.join(timeout=10)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        [run] = client.search_runs([client.get_experiment_by_name("full-store").experiment_id])
        listed = stored_files(client, run.info.run_id)   # while the store's disk is mounted
    warnings = [line for line in lines if "did not reach the artifact store" in line]
    assert 1 <= len(warnings) <= 2 and not any("Traceback" in line for line in lines), "".join(lines)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoints.stored"] == "40,50,60" and "checkpoints.store_error" not in run.data.tags
    assert listed == [f"step-00000{s}.pt{x}" for s in (40, 50, 60) for x in ("", ".sha256")]

"""A crashed `ddpm train` continues in the same MLflow run: kill -9 through the CLI, then --resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ddpm.checkpoint import list_checkpoints
from trained_runs import assert_equals_uninterrupted

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--source", "digits", "--max-images", "300", "--steps", "60", "--num-samples", "32",
         "--fid-extractor", "classifier", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10"]

pytestmark = pytest.mark.slow


def ddpm(*args, env, **kwargs):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kwargs)


def session_processes(session: int) -> list[int]:
    """PIDs of the live processes of session `session` (the CLI started with start_new_session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":   # fields after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def checkpoint_folders(home: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in home.glob("runs/*/checkpoints")}


def test_kill_9_then_resume_continues_the_same_run_and_equals_an_uninterrupted_one(tmp_path):
    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
           "OMP_NUM_THREADS": "1"}
    client = MlflowClient(uri)

    # 1. train, and SIGKILL the CLI process alone (as the OOM killer does) once a mid-run checkpoint
    #    exists: its temporary Prefect server must die with it
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *TRAIN, "--run-name", "crashed"], env=env,
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(list_checkpoints(folder) for folder in checkpoint_folders(home).values()):
        assert process.poll() is None, "training exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    server = [pid for pid in session_processes(process.pid) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert server, "no temporary Prefect server among the CLI's processes"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, f"processes outlived the killed CLI: {left}"
    ((crashed_id, folder),) = checkpoint_folders(home).items()
    on_disk = [int(p.name[5:12]) for p in list_checkpoints(folder)]
    assert max(on_disk) < 60, f"the run was not interrupted mid-way: {on_disk}"
    assert client.get_run(crashed_id).info.status == "RUNNING"   # nobody could say otherwise yet

    # 2. the resume continues the run (that the next run in an experiment marks a vanished run
    #    FAILED: tests/test_run_lifecycle.py; a changed setting with --resume, and a second resume
    #    of the finished run, are refused: tests/test_cli.py, tests/test_run_lifecycle.py)
    resumed = ddpm("train", "--resume", crashed_id, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(crashed_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert "fid_classifier" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(crashed_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 60   # the retrained steps are not logged twice
    assert len(client.search_runs([run.info.experiment_id])) == 1   # no second run

    # 3. its final weights equal those of an uninterrupted training with the run's own configuration
    #    (config.json) in one thread, as the CLI's, bit for bit
    assert_equals_uninterrupted(client, crashed_id, home, folder, tmp_path, steps=60)


def test_sigterm_marks_the_run_killed_and_leaves_no_server_behind(tmp_path):
    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *TRAIN], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(list_checkpoints(folder) for folder in checkpoint_folders(home).values()):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        children = [int(pid) for pid in
                    Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert children, "the temporary Prefect server should be a child of the command"
        process.send_signal(signal.SIGTERM)   # the command alone, as systemd or `kill` would
        stderr = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-2000:]
    ((run_id, _),) = checkpoint_folders(home).items()
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, f"processes {children} outlived the command"
        time.sleep(0.2)

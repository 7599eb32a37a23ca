"""scripts/stack.sh never signals a process it did not start, and `ddpm stack` runs the project's own script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # real Prefect servers and workers

REPO = Path(__file__).resolve().parents[1]


def test_a_stale_pid_file_naming_another_process_is_ignored_not_signalled(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stack = tmp_path / "home" / "stack"
        stack.mkdir(parents=True)
        (stack / "worker.pid").write_text(f"{bystander.pid}\n")   # the PID was reused by `sleep`
        env = {**os.environ, "DDPM_HOME": str(tmp_path / "home")}
        result = subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "stop"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "worker: stale PID file" in result.stderr
        assert bystander.poll() is None   # still alive: not signalled
        assert not (stack / "worker.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_ddpm_stack_runs_the_projects_script_not_the_current_folders(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "stack.sh").write_text("echo IMPOSTOR; exit 7\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "IMPOSTOR" not in result.stdout and result.returncode == 0, result.stdout + result.stderr
    assert "prefect-server: stopped" in result.stdout


def test_deploy_without_a_server_is_one_line_and_ddpm_deploy_takes_the_pool(tmp_path):
    """deploy.sh printed prefect's 70-line traceback; `ddpm deploy --pool docker` was refused by argparse."""
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(tmp_path / "home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--pool", "docker"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (f"deploy.sh: error: no Prefect server answers at http://127.0.0.1:{port}/api: "
                                     "start the stack (scripts/stack.sh start) or set PREFECT_API_URL")

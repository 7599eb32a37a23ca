"""The deployments for real: scripts/stack.sh (a `prefect server`, a process worker, the MLflow UI),
scripts/deploy.sh (this project's prefect.yaml), a run of the `train` deployment, and the `evaluate`
run its completion triggers, which must log FID into the same MLflow run.

Everything lives in a temp folder (PREFECT_HOME, DDPM_HOME, the MLflow store) on free loopback
ports; `stack.sh stop` ends every process in a finally, and the test checks that they are gone.
"""

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ddpm.unet import preset

pytestmark = pytest.mark.slow   # real servers, deployments or the Inception network

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 360   # training + triggered evaluation; ~1.5 minutes on a quiet 2-core machine

TINY_PARAMETERS = {
    "data": {"source": "digits", "max_images": 200},
    "model": preset("tiny-16", base_channels=8, num_groups=4).model_dump(mode="json"),
    "train": {"steps": 10, "batch_size": 16, "warmup_steps": 2, "log_every": 5, "checkpoint_every": 5,
              "keep_last": 2, "ema_decay": 0.99},
    "sampling": {"sampler": "ddim", "num_steps": 5, "num_images": 8, "batch_size": 8},
    "experiment": "deployment-test",
}


@pytest.mark.parametrize("recipe", ["mnist", "digits-conditional"])
def test_a_recipe_deployment_carries_its_recipe(recipe):
    """prefect.yaml names only what the recipe changes; Prefect validates the run's parameters
    against the flow, which fills in the pipeline's defaults (not the config classes')."""
    import yaml

    from flows.train_pipeline import train_pipeline
    from tasks.config import RECIPES, recipe as recipe_config

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    parameters = deployments[f"train-{recipe}"]["parameters"]
    assert parameters == RECIPES[recipe]
    validated = train_pipeline.validate_parameters(parameters)
    for section in parameters:
        assert validated[section] == getattr(recipe_config(recipe), section), section
    assert f"train-{recipe}" in deployments["evaluate"]["triggers"][0]["match_related"]["prefect.resource.name"]


def test_the_serve_deployment_runs_the_champion_server_with_its_defaults():
    """`serve` (local pool, on demand) is flows/serve.py:serve_champion: no parameter needs a value
    (the registered model "ddpm" on 127.0.0.1:5055), and a bad one is refused before a run starts."""
    import inspect

    import yaml
    from prefect.exceptions import ParameterTypeError
    from prefect.flows import load_flow_from_entrypoint

    from tasks import contract

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    serve = deployments["serve"]
    assert serve["work_pool"]["name"] == "local-pool" and not {"schedules", "triggers"} & set(serve)
    path, _, name = serve["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
    assert flow.name == "serve_champion"
    defaults = {k: p.default for k, p in inspect.signature(flow.fn).parameters.items()}
    assert defaults == {"model_name": contract.DEFAULT_MODEL_NAME, "port": 5055, "poll_seconds": 10.0,
                        "check_seconds": 120.0, "host": "127.0.0.1", "token_file": None, "max_queue": 64,
                        "max_batch_images": 64, "stop_seconds": 30.0}
    local = deployments["train"]["work_pool"]   # the local pool's env, plus OpenMP's passive wait
    assert serve["work_pool"] == {**local, "job_variables": {"env": {**local["job_variables"]["env"],
                                                                     "OMP_WAIT_POLICY": "PASSIVE"}}}
    flow.validate_parameters(serve.get("parameters", {}))
    with pytest.raises(ParameterTypeError, match="port"):
        flow.validate_parameters({"port": 70000})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script(name: str, *args: str, env: dict, timeout: int = 180) -> str:
    result = subprocess.run(["bash", str(REPO / "scripts" / name), *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def prefect(args: list[str], env: dict) -> str:
    result = subprocess.run([str(Path(env["PYTHON_BIN"]).parent / "prefect"), *args], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"prefect {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def read_flow_runs(env: dict, flow_name: str) -> list:
    """The flow runs of `flow_name` on the test's server, through the Prefect client in a subprocess
    (this test process's own Prefect settings point at the session harness)."""
    code = (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        f"        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['{flow_name}'])))\n"
        "        print(json.dumps([{'id': str(r.id), 'state': r.state_type.value if r.state_type else None,\n"
        "                           'parameters': r.parameters} for r in runs]))\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([env["PYTHON_BIN"], "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_kubernetes_serving_replicas_run_ddpm_serve_beyond_loopback_with_a_token():
    """deploy/serve-kubernetes.yaml: its arguments are `ddpm serve`'s, it listens beyond loopback with
    the token from a secret, its probes ask /ping, and the pod is given longer than --stop-seconds."""
    import yaml

    from flows.cli.parser import build_parser

    deployment, service = yaml.safe_load_all((REPO / "deploy" / "serve-kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["ddpm", "serve"] and deployment["spec"]["replicas"] >= 2
    args = build_parser(["serve"]).parse_args(["serve", *container["args"]])
    assert args.host == "0.0.0.0" and args.port == container["ports"][0]["containerPort"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DDPM_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert env["OMP_WAIT_POLICY"]["value"] == "PASSIVE"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert pod["terminationGracePeriodSeconds"] > args.stop_seconds
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_training_deployment_triggers_evaluation_into_the_same_mlflow_run(tmp_path):
    import sys

    home = tmp_path / "home"
    store = f"sqlite:///{home / 'mlflow.db'}"
    env = {**os.environ,
           "PYTHON_BIN": sys.executable,
           "DDPM_HOME": str(home), "MLFLOW_TRACKING_URI": store,
           "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "OMP_NUM_THREADS": "1"}   # the machine is shared: one thread per flow-run process
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    started = time.monotonic()
    pids: list[int] = []
    try:
        script("stack.sh", "start", env=env)
        pids = [int((home / "stack" / f"{name}.pid").read_text()) for name in ("prefect-server", "worker", "mlflow")]
        deployed = script("deploy.sh", env=env)
        assert "train_pipeline/train" in deployed and "evaluate/evaluate" in deployed
        assert "serve_champion/serve" in deployed

        out = prefect(["deployment", "run", "train_pipeline/train", "--params", json.dumps(TINY_PARAMETERS)], env)
        train_run_id = next(line.split("UUID:")[-1].strip() for line in out.splitlines() if "UUID" in line)

        # The training run completes, its completion event fires the trigger, the worker runs evaluate.
        evaluation = None
        while time.monotonic() - started < TIMEOUT_S:
            runs = read_flow_runs(env, "evaluate")
            if runs and runs[0]["state"] in ("COMPLETED", "FAILED", "CRASHED"):
                evaluation = runs[0]
                break
            trains = read_flow_runs(env, "train_pipeline")
            assert not trains or trains[0]["state"] not in ("FAILED", "CRASHED"), \
                (home / "stack" / "worker.log").read_text()[-3000:]
            time.sleep(5)
        assert evaluation is not None, "no evaluate run completed in time:\n" + \
            (home / "stack" / "worker.log").read_text()[-3000:]
        assert evaluation["state"] == "COMPLETED", (home / "stack" / "worker.log").read_text()[-3000:]
        assert evaluation["parameters"]["prefect_flow_run_id"] == f"prefect.flow-run.{train_run_id}"

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("deployment-test")
        [run] = client.search_runs([experiment.experiment_id])
        assert run.data.tags["prefect.flow_run_id"] == train_run_id
        assert run.data.tags["evaluate.flow_run_id"] == evaluation["id"]
        history = client.get_metric_history(run.info.run_id, "fid_classifier")
        assert sorted(m.step for m in history) == [5, 10, 10]   # the pipeline's FID + evaluate's curve
        assert run.data.tags["fid.best_step"] in ("5", "10")
    finally:
        script("stack.sh", "stop", env=env, timeout=60)
        print(f"deployment test: {time.monotonic() - started:.0f} s")
    assert pids and not any(alive(pid) for pid in pids)
    assert not (home / "stack" / "worker.pid").exists()


def test_container_deployments_validate_against_their_work_pools(prefect_harness, tmp_path):
    """scripts/deploy.sh --pool docker|kubernetes creates each pool with its base job template
    (deploy/*.json) and `prefect deploy`s train/retrain on it: the server validates the job
    variables against the template, so a wrong one (a GPU count "two") is refused. The jobs
    themselves cannot run here (no Docker, no cluster)."""
    import asyncio
    import sys

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHON_BIN": sys.executable, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect"), "DDPM_HOME": str(tmp_path / "home"),
           "DDPM_IMAGE": "registry.example/ddpm:1", "MLFLOW_SERVER_URI": "http://mlflow.ddpm:5000",
           "DDPM_NAMESPACE": "ddpm"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for pool in ("docker", "kubernetes"):
        deployed = script("deploy.sh", "--pool", pool, env=env)
        assert f"train_pipeline/train-{pool}" in deployed and f"retrain/retrain-{pool}" in deployed

    async def read():
        async with get_client() as client:
            deployments = {name: await client.read_deployment_by_name(name) for name in (
                "train_pipeline/train-docker", "retrain/retrain-docker", "train_pipeline/train-kubernetes")}
            pools = {name: await client.read_work_pool(name) for name in ("docker-pool", "kubernetes-pool")}
            return deployments, pools

    deployments, pools = asyncio.run(read())
    home = str(tmp_path / "home")
    docker = deployments["train_pipeline/train-docker"]
    assert docker.work_pool_name == "docker-pool" and docker.job_variables["image"] == "registry.example/ddpm:1"
    assert docker.job_variables["volumes"] == [f"{home}:{home}"] and docker.job_variables["env"]["DDPM_HOME"] == home
    assert docker.job_variables["container_create_kwargs"]["device_requests"][0]["Count"] == 1
    assert docker.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/ddpm"}}]
    assert deployments["retrain/retrain-docker"].schedules[0].schedule.cron == "0 3 * * *"
    kubernetes = deployments["train_pipeline/train-kubernetes"]
    assert kubernetes.job_variables["gpu_count"] == 1 and kubernetes.job_variables["namespace"] == "ddpm"
    assert kubernetes.job_variables["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow.ddpm:5000"
    assert pools["docker-pool"].type == "docker" and pools["kubernetes-pool"].type == "kubernetes"
    container = pools["kubernetes-pool"].base_job_template["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        if deployment["name"] == "train-kubernetes":
            deployment["work_pool"] = {**deployment["work_pool"],
                                       "job_variables": {**deployment["work_pool"]["job_variables"], "gpu_count": "two"}}
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump(config))
    refused = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                              str(bad), "--name", "train-kubernetes"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    assert re.search(r"two\W{0,3} is not of type \W{0,3}integer", refused.stdout + refused.stderr)

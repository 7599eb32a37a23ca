"""Multi-process training launched by the pipeline: torchrun (gloo, 2 CPU processes) under the
real train_pipeline flow, a real Prefect server and MLflow store.

Proves: 2 processes give one process's losses and weights (same global batch); rank 0 alone logs;
a rank killed with SIGKILL fails the task attempt, and Prefect's retry resumes from the newest
checkpoint to the very weights of an uninterrupted run; a rank's error, an unreachable
rendezvous and too many processes each get one clear line in bounded time; no process outlives
its launcher, even one killed with SIGKILL; a one-node job listens on the loopback interface only.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm.checkpoint import load_checkpoint
from ddpm.data import DataConfig
from ddpm.diffusion import DiffusionConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig, dataset_trainer
from ddpm.unet import preset

MODEL = preset("tiny-16")
DATA = DataConfig(source="digits", max_images=300)
# 60 steps: long enough for the killer thread to strike after the step-20 checkpoint, mid-run
# device "cpu": gloo processes on CPU cores, also on a CUDA machine (bf16 autocast would change the losses)
TRAIN = TrainConfig(steps=60, batch_size=16, warmup_steps=2, log_every=1, checkpoint_every=20, keep_last=3,
                    ema_decay=0.99, learning_rate=1e-3, num_processes=2, device="cpu")
SAMPLING = SamplerConfig(sampler="ddim", num_steps=5, num_images=8, batch_size=8)


def training_processes(marker: str) -> list[int]:
    """PIDs of the live processes whose command line holds `marker` (torchrun and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z" and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def rank_pid(marker: str, rank: int) -> int | None:
    for pid in training_processes(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"-m\0ddpm.train_ddp" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def wait_until_gone(marker: str, seconds: float = 20.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := training_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store and DDPM_HOME for the module (the uninterrupted run is compared against)."""
    root = tmp_path_factory.mktemp("multiprocess")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("DDPM_HOME", str(root / "home"))
        yield root


@pytest.fixture(scope="module")
def two_process_run(prefect_harness, store):
    from flows.train_pipeline import train_pipeline

    return train_pipeline(data=DATA, model=MODEL, train=TRAIN, sampling=SAMPLING, fid_extractor="classifier",
                          experiment="two-processes")


@pytest.mark.slow
def test_two_processes_through_the_flow_give_one_process_losses(two_process_run, store, tmp_path):
    summary = two_process_run
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_processes"] == "2" and run.data.metrics["train.world_size"] == 2
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert [m.step for m in losses] == list(range(1, TRAIN.steps + 1))   # rank 0 alone logs, each step once

    from tasks.config import DEFAULTS

    single_config = TrainConfig(**{**TRAIN.model_dump(), "num_processes": 1})
    single = dataset_trainer(summary["dataset"], MODEL, DEFAULTS.diffusion, single_config, tmp_path / "single")
    single_losses = dict(single.train(progress=False).loss_history)
    difference = max(abs(m.value - single_losses[m.step]) for m in losses)
    print(f"2 processes x 8 vs 1 process x 16 through the flow: max loss difference {difference:.1e}")
    assert difference < 1e-5
    final = load_checkpoint(Path(summary["checkpoint"]))
    assert final["world_size"] == 2
    assert max((final["model"][k] - v).abs().max().item() for k, v in single.model.state_dict().items()) < 1e-4


@pytest.mark.slow
def test_a_killed_rank_fails_the_attempt_and_the_retry_resumes_to_the_same_weights(two_process_run, store, caplog):
    """SIGKILL of rank 1 right after the step-20 checkpoint: the task attempt fails naming rank 1 and
    the signal, Prefect retries, the retry resumes at step 20 and ends on the uninterrupted run's
    weights bit for bit; no process is left behind."""
    from flows.train_pipeline import train_pipeline

    home = Path(os.environ["DDPM_HOME"])
    before = set((home / "runs").iterdir())
    killed: list[int] = []

    def kill_rank_1_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            new_runs = set((home / "runs").iterdir()) - before
            for run_dir in new_runs:
                if (run_dir / "checkpoints" / "step-0000020.pt.sha256").exists():
                    pid = rank_pid(str(run_dir), 1)
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint, daemon=True)
    killer.start()
    summary = train_pipeline(data=DATA, model=MODEL, train=TRAIN, sampling=SAMPLING, fid_extractor="classifier",
                             experiment="killed-rank")
    killer.join(5)
    assert killed, "rank 1 was never seen after the first checkpoint"
    run_dir = Path(summary["checkpoint"]).parents[1]
    log = (run_dir / "train-processes.log").read_text()
    assert "SIGKILL" in log and summary["resumed_from"] == 20
    # the failed attempt, as Prefect logged it before retrying: the rank and the signal, in one line
    failed = [r.getMessage() for r in caplog.records if "TrainingProcessError" in r.getMessage()]
    assert failed and "training process rank 1 of 2 was killed by SIGKILL" in failed[0]
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    resumed, straight = load_checkpoint(Path(summary["checkpoint"])), load_checkpoint(Path(two_process_run["checkpoint"]))
    for part in ("model", "ema"):
        assert all(torch.equal(resumed[part][k], straight[part][k]) for k in straight[part]), part
    assert not wait_until_gone(str(run_dir))


@pytest.mark.slow
def test_a_rank_error_fails_at_once_naming_the_rank_and_the_error(two_process_run, tmp_path):
    """Every rank refuses a checkpoint of another noise schedule: a one-line error, not retried."""
    from ddpm.torchrun import TrainingProcessError, train_under_torchrun

    checkpoint_dir = tmp_path / "run" / "checkpoints"
    checkpoint_dir.mkdir(parents=True)
    source = Path(two_process_run["checkpoint"])
    for suffix in ("", ".sha256"):
        (checkpoint_dir / (source.name + suffix)).write_bytes(Path(str(source) + suffix).read_bytes())
    longer = TrainConfig(**{**TRAIN.model_dump(), "steps": 80})
    with pytest.raises(TrainingProcessError, match=r"rank [01] of 2 failed: CheckpointError: .*trained with diffusion") \
            as failure:   # the run's checkpoint has the pipeline's cosine schedule, DiffusionConfig() is linear
        train_under_torchrun(two_process_run["dataset"], MODEL, DiffusionConfig(), longer, str(checkpoint_dir))
    assert not failure.value.retryable and "\n" not in str(failure.value)
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [source.name, source.name + ".sha256"]  # untouched


@pytest.mark.slow
def test_an_unreachable_rendezvous_fails_in_bounded_time(two_process_run, tmp_path):
    from ddpm.torchrun import TrainingProcessError, train_under_torchrun

    two_nodes = TrainConfig(**{**TRAIN.model_dump(), "num_processes": 1, "nnodes": 2,
                               "rdzv_endpoint": "192.0.2.1:29400", "rdzv_timeout": 3})   # TEST-NET-1: no host
    start = time.monotonic()
    with pytest.raises(TrainingProcessError, match=r"rendezvous at 192\.0\.2\.1:29400 failed"):
        train_under_torchrun(two_process_run["dataset"], MODEL, DiffusionConfig(), two_nodes,
                             str(tmp_path / "run" / "checkpoints"))
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_a_launcher_killed_outright_leaves_no_training_process(two_process_run, tmp_path):
    """kill -9 of the process that launched torchrun: torchrun and both workers end too."""
    checkpoint_dir = tmp_path / "orphan-check" / "checkpoints"
    long = TrainConfig(**{**TRAIN.model_dump(), "steps": 100_000})
    code = ("import sys; from ddpm.diffusion import DiffusionConfig; from ddpm.training import TrainConfig; "
            "from ddpm.unet import preset; from ddpm.torchrun import train_under_torchrun; "
            f"train_under_torchrun({str(two_process_run['dataset'])!r}, preset('tiny-16'), DiffusionConfig(), "
            f"TrainConfig.model_validate_json({long.model_dump_json()!r}), {str(checkpoint_dir)!r})")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while rank_pid(str(checkpoint_dir), 1) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rank_pid(str(checkpoint_dir), 1) is not None, "the workers never started"
        launcher.kill()
        launcher.wait()
        assert not wait_until_gone(str(checkpoint_dir))
    finally:
        for pid in training_processes(str(checkpoint_dir)):
            os.kill(pid, signal.SIGKILL)


def listening_addresses(pids: list[int]) -> list[tuple]:
    """(ip address, port) of every TCP socket in LISTEN state that one of `pids` holds (/proc/net/tcp{,6})."""
    import ipaddress

    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A" and inode in inodes:   # 0A: LISTEN
                host, port = local.split(":")
                raw = bytes.fromhex(host)   # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((ipaddress.ip_address(raw), int(port, 16)))
    return found


@pytest.mark.slow
def test_a_one_node_job_listens_on_the_loopback_interface_only(two_process_run, tmp_path):
    """torchrun --standalone served its unauthenticated rendezvous store on every interface
    (*:port); one node's launcher, its workers' store and gloo's sockets now listen on 127.0.0.1."""
    from ddpm.torchrun import train_under_torchrun

    checkpoint_dir = tmp_path / "loopback" / "checkpoints"
    seen = []

    def inspect(step, path):
        if not seen:
            pids = training_processes(str(checkpoint_dir))
            seen.extend(listening_addresses(pids))
            assert len(pids) == 3   # the launcher and its two workers, all alive now

    train = TrainConfig(**{**TRAIN.model_dump(), "steps": 20, "checkpoint_every": 10})
    result = train_under_torchrun(str(two_process_run["dataset"]), MODEL, DiffusionConfig(), train,
                                  str(checkpoint_dir), on_checkpoint=inspect)
    assert result.step == 20
    assert seen, "no listening socket found: the store must be one"
    assert all(address.is_loopback for address, _ in seen), seen


@pytest.mark.slow
def test_more_processes_than_devices_is_refused_before_any_run(prefect_harness, mlflow_store):
    from flows.train_pipeline import train_pipeline

    with pytest.raises(ValueError, match=r"num_processes=64 but this machine has \d+ CPU core"):
        train_pipeline(data=DATA, model=MODEL, train={"num_processes": 64, "batch_size": 64, "device": "cpu"},
                       experiment="too-many")
    assert MlflowClient(mlflow_store).get_experiment_by_name("too-many") is None


def torchrun_summary(failures: dict[int, tuple[int, int]]) -> list[str]:
    """The failure block torchrun prints, made by torch's own ChildFailedError: {rank: (exitcode, pid)}."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failed = {rank: ProcessFailure(local_rank=rank, pid=pid, exitcode=code, error_file="<N/A>")
              for rank, (code, pid) in failures.items()}
    return ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
            + ChildFailedError("train_worker", failed).format_msg()).splitlines()


CONNECTION_RESET = {"type": "RuntimeError", "retryable": True,
                    "message": "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:43674: Connection reset by peer"}


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_killed_rank_is_blamed_over_the_peer_that_lost_its_connection(order):
    """Rank 1 is SIGKILLed and rank 0 fails on the broken connection within the same second; which
    one torchrun names as first observed depends on timing, the error names rank 1 and the signal."""
    from ddpm.torchrun import failure

    failures = {0: (1, 100), 1: (-9, 101)}
    tail = torchrun_summary({rank: failures[rank] for rank in order})
    error = failure(1, {0: {"rank": 0, **CONNECTION_RESET}}, tail, 2, Path("train-processes.log"))
    assert str(error).startswith("training process rank 1 of 2 was killed by SIGKILL"), error


def test_a_lost_connection_is_named_when_no_other_rank_failed():
    from ddpm.torchrun import failure

    tail = torchrun_summary({0: (1, 100)})
    error = failure(1, {0: {"rank": 0, **CONNECTION_RESET}}, tail, 2, Path("train-processes.log"))
    assert str(error).startswith("training process rank 0 of 2 failed: RuntimeError: [gloo"), error
    assert error.retryable


def test_a_signal_is_blamed_before_a_rank_that_only_exited():
    """Rank 0 lost its peer, rank 1 exited with 1 and printed nothing, rank 2 was SIGKILLed: rank 2."""
    from ddpm.torchrun import failure

    tail = torchrun_summary({0: (1, 100), 1: (1, 101), 2: (-9, 102)})
    error = failure(1, {0: {"rank": 0, **CONNECTION_RESET}}, tail, 3, Path("train-processes.log"))
    assert str(error).startswith("training process rank 2 of 3 was killed by SIGKILL"), error

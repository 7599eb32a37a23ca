"""The MLflow run lifecycle: RUNNING while working, FINISHED/FAILED/KILLED at the end, a vanished
process's run failed when next seen, a resume refused when it makes no sense, a new store safe
to open from two processes at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import contract, tracking

pytestmark = pytest.mark.slow   # a fresh MLflow store per test (~2 s each), processes killed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    return tracking.client()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_is_finished_failed_or_killed_by_how_its_block_ends(store):
    from prefect.exceptions import TerminationSignal

    ids = [tracking.create_run("lifecycle", None, {"train": {"lr": 1e-3}}) for _ in range(4)]
    assert store.get_run(ids[0]).info.status == "RUNNING"
    assert store.get_run(ids[0]).data.params == {"train.lr": "0.001"}
    with tracking.run_lifecycle(ids[0]):
        pass
    with pytest.raises(ValueError), tracking.run_lifecycle(ids[1]):
        raise ValueError("bad")
    with pytest.raises(KeyboardInterrupt), tracking.run_lifecycle(ids[2]):
        raise KeyboardInterrupt
    with pytest.raises(TerminationSignal), tracking.run_lifecycle(ids[3]):   # SIGTERM inside a flow run
        raise TerminationSignal(15)
    assert [store.get_run(i).info.status for i in ids] == ["FINISHED", "FAILED", "KILLED", "KILLED"]
    # the MLflow UI opens the experiment in its model-training view, not the GenAI one
    assert store.get_experiment_by_name("lifecycle").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "ValueError: bad" in store.get_run(ids[1]).data.tags["error"]


def test_a_run_whose_process_vanished_is_failed_when_the_experiment_is_next_used(store):
    alive = tracking.create_run("lifecycle", "alive", {})
    gone = tracking.create_run("lifecycle", "gone", {})
    store.set_tag(gone, contract.PID_TAG, str(dead_pid()))
    other_host = tracking.create_run("lifecycle", "elsewhere", {})
    store.set_tag(other_host, contract.HOST_TAG, "another-machine")
    store.set_tag(other_host, contract.PID_TAG, str(dead_pid()))

    assert tracking.mark_vanished_runs("lifecycle") == [gone]
    assert store.get_run(gone).info.status == "FAILED"
    assert f"ddpm train --resume {gone}" in store.get_run(gone).data.tags["error"]
    assert store.get_run(alive).info.status == store.get_run(other_host).info.status == "RUNNING"
    assert tracking.mark_vanished_runs("no-such-experiment") == []


def test_reopen_refuses_a_finished_run_and_one_still_running_elsewhere(store):
    finished = tracking.create_run("lifecycle", None, {})
    store.set_terminated(finished)
    with pytest.raises(ValueError, match="FINISHED: nothing to resume"):
        tracking.reopen_run(finished)
    busy = tracking.create_run("lifecycle", None, {})
    store.set_tag(busy, contract.PID_TAG, str(os.getppid()))   # a live process that is not this one
    with pytest.raises(ValueError, match="still RUNNING in process"):
        tracking.reopen_run(busy)
    with pytest.raises(tracking.RunNotFoundError):
        tracking.reopen_run("0" * 32)

    failed = tracking.create_run("lifecycle", None, {})
    store.set_terminated(failed, "FAILED")
    tracking.reopen_run(failed)
    run = store.get_run(failed)
    assert run.info.status == "RUNNING" and run.data.tags["resumed"] == "1"
    assert run.data.tags[contract.PID_TAG] == str(os.getpid())


def test_force_declares_a_running_owner_dead_and_says_so_on_the_run(store):
    """A run RUNNING on another machine (or under a PID a reboot reused) is resumable only by force."""
    elsewhere = tracking.create_run("lifecycle", None, {})
    store.set_tag(elsewhere, contract.HOST_TAG, "preempted-node")
    store.set_tag(elsewhere, contract.PID_TAG, "4242")
    with pytest.raises(ValueError, match=f"declare it dead: `ddpm train --resume {elsewhere} --force`"):
        tracking.reopen_run(elsewhere)
    tracking.reopen_run(elsewhere, force=True)
    run = store.get_run(elsewhere)
    assert run.info.status == "RUNNING" and run.data.tags[contract.PID_TAG] == str(os.getpid())
    assert "was RUNNING in process 4242 on preempted-node" in run.data.tags[contract.RESUME_FORCED_TAG]


def test_force_never_overrides_an_owner_alive_on_this_host(store):
    """--force declared dead an owner it could see alive: two trainers on one run and one folder."""
    busy = tracking.create_run("lifecycle", None, {})
    owner = os.getppid()   # a live process that is not this one, on this host
    store.set_tag(busy, contract.PID_TAG, str(owner))
    with pytest.raises(ValueError, match=f"alive on this host: stop it first \\(kill {owner}\\)"):
        tracking.reopen_run(busy, force=True)
    assert store.get_run(busy).data.tags[contract.PID_TAG] == str(owner)   # still its owner's
    assert contract.RESUME_FORCED_TAG not in store.get_run(busy).data.tags


def test_a_resumed_run_that_finishes_keeps_the_failed_attempts_error_only_as_history(store):
    run_id = tracking.create_run("lifecycle", None, {})
    with pytest.raises(ValueError), tracking.run_lifecycle(run_id):
        raise ValueError("the first attempt")
    tracking.reopen_run(run_id)
    with tracking.run_lifecycle(run_id):
        pass
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED" and contract.ERROR_TAG not in run.data.tags
    assert "ValueError: the first attempt" in run.data.tags[contract.PREVIOUS_ERROR_TAG]


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", "tab\there", "back\\slash", " padded"])
def test_an_experiment_name_never_becomes_a_path_outside_the_store(store, name, tmp_path):
    from flows.train_pipeline import train_pipeline
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ValueError, match="is refused") as raised:
        tracking.create_run(name, None, {})
    assert "\n" not in str(raised.value)
    assert store.get_experiment_by_name(name) is None
    with pytest.raises(ParameterTypeError, match="is refused"):   # a deployment's parameter: before a run
        train_pipeline.validate_parameters({"experiment": name})


@pytest.mark.slow
def test_of_two_resumes_of_one_run_at_the_same_instant_only_one_proceeds(store, tmp_path):
    run_id = tracking.create_run("lifecycle", None, {})
    store.set_terminated(run_id, "FAILED")
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "from tasks import tracking\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "try:\n"
            f"    tracking.reopen_run({run_id!r}); print('resumed', flush=True); time.sleep(5)\n"
            "except ValueError as error:\n"
            "    print('refused', error)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    time.sleep(8)   # both imported and waiting
    go.touch()
    outputs = sorted(p.communicate(timeout=120)[0].split()[0] for p in processes)
    assert outputs == ["refused", "resumed"], outputs


def test_two_processes_opening_a_new_store_at_once_both_succeed(tmp_path):
    """Unserialised, MLflow's table creation crashed one of two (measured: 4 failures in 6)."""
    code = "from tasks import tracking; tracking.experiment_id('ddpm')"
    for trial in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(tmp_path / f"home{trial}"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / f'mlflow{trial}.db'}"}
        processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
        errors = [p.communicate(timeout=120)[1] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-500:] for e in errors)


def test_steps_already_logged_before_a_crash_are_not_logged_again(store):
    """A resumed run retrains the steps after its checkpoint; their metrics are logged once."""
    run_id = tracking.create_run("lifecycle", None, {})
    buffer = tracking.MetricBuffer(run_id, system_metrics=False, skip_through=20)
    for step in (10, 20, 30):
        buffer.log(step, {"loss": float(step)})
    buffer.flush()
    assert [m.step for m in store.get_metric_history(run_id, "loss")] == [30]


def test_an_existing_store_is_opened_without_writing_beside_it(store, tmp_path):
    """The creation lock is for a new store only: `ddpm sample --model` on a read-only store created
    a lock file beside it (and failed where that folder is not writable)."""
    (tmp_path / "mlflow.db.init-lock").unlink(missing_ok=True)
    tracking._INITIALISED_STORES.clear()   # as a new process opens it
    before = sorted(p.name for p in tmp_path.iterdir())
    assert tracking.client().get_experiment_by_name("Default") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == before

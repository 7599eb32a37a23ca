"""tasks.run_files and the registry's bundle cache: a reader takes the local copy when it is valid,
else fetches from the store and verifies; a damaged copy is fetched once more, then one line names
the file; nothing valid is thrown away. A real sqlite store with its artifacts in a temp folder."""

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ddpm.checkpoint import checkpoint_step, list_checkpoints, verify_checkpoint
from trained_runs import tiny_checkpoint


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def published_run(mlflow_store, tmp_path, monkeypatch):
    """A run whose two checkpoints were published by CheckpointPublisher, then lost on this host."""
    from tasks import run_files, tracking

    monkeypatch.setenv("DDPM_PUBLISH_CHECKPOINTS", "on")
    run_id = tracking.create_run("files", "published", {})
    trained = tmp_path / "trained-elsewhere"
    first = tiny_checkpoint(trained / "a", steps=2)
    second = tiny_checkpoint(trained / "b", steps=3)
    publisher = run_files.CheckpointPublisher(run_id, trained, keep_last=2)
    publisher(2, first)
    publisher(3, second)
    assert publisher.close() == [2, 3]
    return tracking.client().get_run(run_id)


def store_copy(run, name: str) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / name


def test_a_published_checkpoint_is_fetched_verified_and_then_read_locally(published_run):
    from tasks import contract, run_files

    run = published_run
    assert run.data.tags[contract.CHECKPOINTS_STORED_TAG] == "2,3"
    assert run_files.stored_steps(run.info.run_id) == [2, 3]
    fetched = run_files.checkpoint(run)
    assert checkpoint_step(fetched) == 3 and fetched.parent == run_files.checkpoint_folders(run)[-1]
    verify_checkpoint(fetched)
    assert [checkpoint_step(p) for p in run_files.checkpoints(run)] == [3]   # the local copy is used now
    store_copy(run, "step-0000003.pt").unlink()                               # ... even with the store's gone
    assert run_files.checkpoint(run) == fetched


def test_a_damaged_local_copy_is_fetched_again_and_a_damaged_store_copy_is_one_line(published_run):
    from tasks import run_files

    run = published_run
    local = run_files.checkpoint(run, step=2)
    flip_a_byte(local)
    assert run_files.checkpoint(run, step=2) == local   # fetched again over the damaged copy
    verify_checkpoint(local)

    flip_a_byte(store_copy(run, "step-0000003.pt"))
    with pytest.raises(run_files.StoreFileError) as raised:
        run_files.checkpoint(run, step=3)
    message = str(raised.value)
    assert "\n" not in message and "checkpoints/step-0000003.pt" in message and "corrupt" in message
    assert not (local.parent / "step-0000003.pt").exists()   # nothing unverified left under the real name


def test_keep_last_holds_in_the_store(mlflow_store, tmp_path, monkeypatch):
    from tasks import contract, run_files, tracking

    run_id = tracking.create_run("files", "pruned", {})
    publisher = run_files.CheckpointPublisher(run_id, tmp_path, keep_last=2)
    for step in (1, 2, 3):
        publisher(step, tiny_checkpoint(tmp_path / f"c{step}", steps=step))
    assert publisher.close() == [2, 3]
    assert run_files.stored_steps(run_id) == [2, 3]
    assert tracking.client().get_run(run_id).data.tags[contract.CHECKPOINTS_STORED_TAG] == "2,3"
    assert not list(tmp_path.glob("runs/*/.publishing"))   # the staging links are gone


def test_a_full_cache_disk_is_one_line(published_run, tmp_path, monkeypatch):
    from ddpm.disk import DiskFull
    from tasks import run_files

    folder = run_files.checkpoint_folders(published_run)[-1]
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small filesystem needs mount rights (root): {mounted.stderr.strip()}")
    try:
        with pytest.raises(DiskFull) as raised:
            run_files.checkpoint(published_run)
        assert "\n" not in str(raised.value) and "not enough disk space" in str(raised.value)
        assert list_checkpoints(folder) == []
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_damaged_cached_registry_bundle_heals_and_files_gone_from_the_store_are_one_line(mlflow_store, tmp_path):
    import shutil

    from tasks import tracking
    from tasks.registry import champion_bundle
    from tasks.serving import log_ddpm_model

    run_id = tracking.create_run("files", "registered", {})
    log_ddpm_model(run_id, tiny_checkpoint(tmp_path / "c", steps=2), "healing")
    bundle = champion_bundle("healing", 1)
    flip_a_byte(bundle)
    healed = champion_bundle("healing", 1)   # the cached copy failed its checksum: fetched again
    verify_checkpoint(healed)

    source = MlflowClient(mlflow_store).get_model_version("healing", "1").source
    store = tracking.client().get_logged_model(source.removeprefix("models:/")).artifact_location
    shutil.rmtree(Path(store.removeprefix("file://")))
    flip_a_byte(healed)
    with pytest.raises(LookupError) as raised:
        champion_bundle("healing", 1)
    assert "\n" not in str(raised.value) and "healing version 1" in str(raised.value)


@pytest.mark.slow
def test_a_champion_whose_files_are_gone_from_the_store_makes_the_night_train_from_scratch(
        prefect_harness, mlflow_store, tmp_path):
    import shutil

    from flows.retrain import retrain
    from flows.train_pipeline import train_pipeline
    from tasks import settings, tracking
    from tasks.registry import promote_best
    from test_retrain import write_digits
    from trained_runs import TINY_MODEL

    folder = tmp_path / "incoming"
    write_digits(folder, range(0, 300))
    params = dict(data={"source": f"folder:{folder}"}, model=TINY_MODEL, diffusion={"num_timesteps": 100},
                  train={"steps": 10, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 10, "progress_images": 0,
                         "device": "cpu"},
                  sampling={"num_images": 32, "batch_size": 32, "num_steps": 4}, fid_extractor="classifier")
    train_pipeline(**params, experiment="gone")
    assert promote_best("gone", "gone-model")["moved"]
    source = MlflowClient(mlflow_store).get_model_version("gone-model", "1").source
    store = tracking.client().get_logged_model(source.removeprefix("models:/")).artifact_location
    shutil.rmtree(Path(store.removeprefix("file://")))          # the champion's files are deleted from the store
    shutil.rmtree(settings.ddpm_home() / "registry", ignore_errors=True)
    write_digits(folder, range(300, 340))                       # the night's new images: a warm start, normally
    result = retrain(experiment="gone", promote_to="gone-model")
    assert result["decision"] == "scratch" and "champion's weights cannot be read" in result["reason"]
    run = MlflowClient(mlflow_store).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["retrain.decision"] == "scratch"
    assert "retrain.champion_version" not in run.data.tags


def test_credentials_in_a_tracking_uri_never_reach_a_message():
    import socket

    from tasks.settings import ServerUnreachable, check_reachable, redact

    assert redact("postgresql://ddpm:s3cret@db:5432/mlflow") == "postgresql://ddpm:***@db:5432/mlflow"
    assert redact("https://user:token@mlflow.example/path") == "https://user:***@mlflow.example/path"
    for plain in ("http://127.0.0.1:5000", "sqlite:////srv/mlflow.db", "https://only-user@mlflow.example"):
        assert redact(plain) == plain
    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerUnreachable) as raised:
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}", "the MLflow tracking server")
    assert "s3cret" not in str(raised.value) and "alice:***@127.0.0.1" in str(raised.value)

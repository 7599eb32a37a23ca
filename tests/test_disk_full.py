"""A full disk, as a long run meets it: said before training when the checkpoints cannot fit, one
line when the disk fills mid-run, nothing saved lost, and `--resume` continuing to the same
weights once space is freed. The small disk is a real filesystem (a tmpfs of a few MiB), so the
tests that need one run as root and skip cleanly elsewhere."""

import errno
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint
from ddpm.disk import DiskFull, NotWritable, is_disk_full
from ddpm.training import TrainConfig, Trainer, checkpoint_disk_need
from trained_runs import TINY_DIFFUSION, TINY_MODEL, assert_equals_uninterrupted

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--source", "digits", "--max-images", "300", "--steps", "60", "--num-samples", "32",
         "--fid-extractor", "classifier", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10"]


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` for the block; the test skips where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small filesystem needs mount rights (root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file on `disk` until the disk is full, as another program would; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def ddpm_env(tmp_path: Path, home: Path) -> dict:
    """The CLI's environment with DDPM_HOME (and so the MLflow store and the checkpoints) on `home`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_the_estimate_of_a_checkpoint_covers_the_file_it_writes(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=0, log_every=1, checkpoint_every=2, keep_last=1,
                         device="cpu")
    trainer = Trainer(TINY_MODEL, TINY_DIFFUSION, config,
                      lambda i: torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                      tmp_path)
    trainer.train(progress=False)
    (written,) = list_checkpoints(tmp_path)
    # keep_last 1 over 2 checkpoints: the kept one, and the next written before it goes
    needed, what = checkpoint_disk_need(TINY_MODEL, config)
    per_checkpoint = needed / 2
    assert written.stat().st_size <= per_checkpoint <= written.stat().st_size + (1 << 20) + 4096, what
    assert what.startswith("2 checkpoint(s)")
    # a resume counts what is there: one more checkpoint at most
    assert checkpoint_disk_need(TINY_MODEL, config, checkpoints_on_disk=1)[0] == per_checkpoint


def test_a_checkpoint_folder_that_cannot_be_written_is_said_before_the_first_step(tmp_path):
    (tmp_path / "a-file").write_text("")
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=0, checkpoint_every=2, device="cpu")
    trainer = Trainer(TINY_MODEL, TINY_DIFFUSION, config, lambda i: torch.zeros(4, 1, 16, 16),
                      tmp_path / "a-file" / "checkpoints")
    with pytest.raises(NotWritable, match=r"^the checkpoint folder .*a-file/checkpoints cannot be written: "):
        trainer.train(progress=False)
    assert trainer.step == 0


def test_disk_full_is_recognised_through_the_layers_that_reword_it():
    import sqlite3

    try:
        raise RuntimeError("mlflow could not log") from sqlite3.OperationalError("database or disk is full")
    except RuntimeError as error:
        assert is_disk_full(error)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(DiskFull("x")) and isinstance(DiskFull("x"), OSError)
    import pickle   # it crosses processes (Dask workers) whole
    assert str(pickle.loads(pickle.dumps(DiskFull("the disk is full")))) == "the disk is full"
    assert is_disk_full(RuntimeError("training process rank 1 of 2 failed: DiskFull: not enough disk space ..."))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_refused_before_writing_and_keeps_the_others(tmp_path):
    with small_disk(tmp_path / "disk", "3m") as disk:
        state = {"weights": torch.zeros(256 * 1024)}   # 1 MiB
        kept = save_checkpoint(state, disk / "ckpt", 1)
        (disk / "other").write_bytes(b"\0" * 2**20)   # ~1 MiB left: less than the next one needs
        with pytest.raises(DiskFull, match=r"checkpoint .*step-0000002\.pt: it needs 2\.0 MiB .* the newest is "
                                           r"step-0000001\.pt"):
            save_checkpoint(state, disk / "ckpt", 2)
        verify_checkpoint(kept)
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["step-0000001.pt", "step-0000001.pt.sha256"]


@pytest.mark.slow
def test_a_run_whose_checkpoints_cannot_fit_is_one_line_before_anything_starts(tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--steps", "1500"],
                                env=ddpm_env(tmp_path, disk), cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("ddpm train: error: not enough disk space for the run's checkpoints"), line
        assert "train.keep_last" in line and "DDPM_HOME" in line, line
        assert time.monotonic() - started < 60   # before Prefect, the data and the MLflow store
        assert not (disk / "mlflow.db").exists() and not (disk / "data").exists()


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_one_line_and_the_run_resumes_to_the_same_weights(tmp_path):
    with small_disk(tmp_path / "disk", "64m") as home:
        env = ddpm_env(tmp_path, home)
        stderr = tmp_path / "stderr.txt"
        with open(stderr, "w") as err, open(tmp_path / "stdout.txt", "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "flows.cli", *TRAIN], env=env, cwd=tmp_path,
                                       stdout=out, stderr=err)
            deadline = time.monotonic() + 300
            while not any(list_checkpoints(folder) for folder in home.glob("runs/*/checkpoints")):
                assert process.poll() is None, stderr.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            filler = fill(home)   # another program fills the disk while the run trains
            assert process.wait(timeout=300) == 1
        text = stderr.read_text()
        (folder,) = home.glob("runs/*/checkpoints")
        run_id = folder.parent.name
        errors = [line for line in text.splitlines() if "error:" in line]
        assert "Traceback" not in text and "Logging error" not in text, text[-3000:]
        assert len(text.splitlines()) <= 15, text[-3000:]   # the flow's progress, the failure once or twice
        assert len(errors) == 1 and errors[0].startswith("ddpm train: error: "), text[-3000:]
        assert "disk" in errors[0] and f"ddpm train --resume {run_id}" in errors[0], errors[0]
        written = list_checkpoints(folder)
        assert written and max(int(p.name[5:12]) for p in written) < 60
        for checkpoint in written:
            verify_checkpoint(checkpoint)   # every checkpoint written stays loadable

        filler.unlink()   # space freed: the run continues from its newest checkpoint
        resumed = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--resume", run_id], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert len(steps) == len(set(steps)) and max(steps) == 60

        # the same weights as an uninterrupted training of the run's configuration, bit for bit
        assert_equals_uninterrupted(client, run_id, home, folder, tmp_path, steps=60)

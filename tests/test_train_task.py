"""The Prefect training task: batched MLflow metrics (with system metrics) on a real sqlite store,
and a retry after a failure that follows a checkpoint resumes from it instead of restarting."""

from pathlib import Path

import pytest
import torch

from ddpm.data import DataConfig, prepare_dataset
from ddpm.diffusion import DiffusionConfig
from ddpm.training import TrainConfig
from ddpm.unet import preset
from ddpm.utilisation import matmul_peak, training_flops_per_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An MLflow sqlite store and DDPM_HOME in tmp_path; yields (client, run_id) of a fresh run."""
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from tasks import tracking

    client = tracking.client()
    run = client.create_run(tracking.experiment_id("test-train"))
    return client, run.info.run_id


def test_metric_buffer_batches_and_adds_system_metrics(mlflow_store):
    from tasks.tracking import MetricBuffer

    client, run_id = mlflow_store
    buffer = MetricBuffer(run_id, flush_every=10)
    for step in range(1, 26):
        buffer.log(step, {"loss": 1.0 / step, "lr": 1e-4})
    buffer.flush()
    assert buffer.calls == 25 and buffer.batches == 3  # 10 + 10 + 5 logs, one log_batch each
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 26))
    assert history[0].value == pytest.approx(1.0 / history[0].step)
    rss = client.get_metric_history(run_id, "system.process_rss_mb")
    assert len(rss) == 25 and all(m.value > 10 for m in rss)  # a Python process with torch holds > 10 MiB
    assert len(client.get_metric_history(run_id, "system.cpu_percent")) == 25
    assert buffer.seconds > 0


@pytest.mark.slow
def test_train_task_failing_after_a_checkpoint_is_retried_and_resumes(prefect_harness, mlflow_store, tmp_path):
    """The first attempt crashes right after writing the step-4 checkpoint (through the task's
    on_checkpoint hook); Prefect retries the task, which resumes at step 4 and finishes."""
    from prefect import flow

    from tasks.train import train_model

    client, run_id = mlflow_store
    dataset = prepare_dataset(DataConfig(max_images=128), tmp_path / "data")
    train_config = TrainConfig(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_every=1,
                               checkpoint_every=2, keep_last=5)
    attempts = []

    def crash_once_after_step_4(step: int, path: Path) -> None:
        if step == 4 and not attempts:
            attempts.append(path)
            raise RuntimeError("simulated crash after writing the step-4 checkpoint")

    @flow(name="train-retry-test")
    def train_flow():
        return train_model(str(dataset), preset("tiny-16"), DiffusionConfig(), train_config, run_id,
                           str(tmp_path / "checkpoints"), on_checkpoint=crash_once_after_step_4)

    result = train_flow()
    assert len(attempts) == 1  # the hook did crash the first attempt
    assert result["resumed_from"] == 4 and result["steps"] == 6
    assert [Path(p).name for p in result["checkpoints"]] == ["step-0000002.pt", "step-0000004.pt", "step-0000006.pt"]
    assert result["checkpoint"] == result["checkpoints"][-1]
    assert result["log_batches"] < result["log_calls"]
    print(f"logging overhead {100 * result['logging_fraction']:.2f}% of train() time "
          f"({result['log_calls']} logs in {result['log_batches']} batches)")
    # both attempts logged into the flow's MLflow run: the last steps once the retry finished
    steps_logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert steps_logged == {1, 2, 3, 4, 5, 6}
    assert client.get_metric_history(run_id, "train.steps")[-1].value == 6
    # the utilisation of the attempt that finished: FLOPs per image x images/s against the peak
    assert result["gflops_per_image"] == training_flops_per_image(preset("tiny-16")) / 1e9
    assert result["achieved_gflops_per_second"] == pytest.approx(result["gflops_per_image"] * result["images_per_second"])
    assert result["peak_gflops_per_second"] == matmul_peak(torch.float32, torch.device("cpu"))   # fp32, one CPU
    assert result["mfu"] == pytest.approx(result["achieved_gflops_per_second"] / result["peak_gflops_per_second"])
    assert client.get_metric_history(run_id, "train.mfu")[-1].value == pytest.approx(result["mfu"])
    assert "compile_seconds" not in result

    # resumed again after a failure that came after training (sampling, FID): nothing trains and
    # what the run logged stays (the summary was overwritten by 0 images/s and a NaN loss)
    attempts.append("no more crashes")
    again = train_flow()
    assert again["resumed_from"] == 6 and again["steps"] == 6
    for key in ("final_loss", "images_per_second", "mfu"):
        assert again[key] == pytest.approx(result[key]), key
        assert client.get_metric_history(run_id, f"train.{key}")[-1].value == pytest.approx(result[key]), key


def test_a_progress_grid_that_fails_warns_and_lets_training_go_on(tmp_path):
    import logging

    from tasks.sample import progress_grid

    # a handler on the module's own logger: Prefect's logging set-up replaces the root's (caplog's)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("tasks.sample").addHandler(handler)
    try:
        progress_grid("no-such-run", 4)(3, tmp_path / "step-0000003.pt")   # no such checkpoint: no exception
    finally:
        logging.getLogger("tasks.sample").removeHandler(handler)
    assert [w.getMessage().split(": /")[0] for w in warnings] == [
        "no progress grid at step 3: CheckpointError: checkpoint not found"]

"""train_pipeline end to end on a real (temporary) Prefect server and a real MLflow sqlite store."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ddpm.data import DataConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import preset

TINY_TRAIN = TrainConfig(steps=12, batch_size=16, warmup_steps=2, log_every=4, checkpoint_every=6, keep_last=2,
                         ema_decay=0.99, learning_rate=1e-3)
TINY_SAMPLING = SamplerConfig(sampler="ddim", num_steps=5, num_images=8, batch_size=8)
TINY_MODEL = preset("tiny-16", base_channels=8, num_groups=4)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    return uri


def test_pipeline_trains_samples_and_tracks_everything(prefect_harness, mlflow_store, tmp_path):
    from flows.train_pipeline import train_pipeline

    data = DataConfig(source="digits", max_images=200)
    result = train_pipeline(data=data, model=TINY_MODEL, train=TINY_TRAIN, sampling=TINY_SAMPLING,
                            experiment="pipeline-test", return_state=True)
    assert result.is_completed()
    summary = result.result()
    flow_run_id = str(result.state_details.flow_run_id)

    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == flow_run_id
    assert run.data.tags["dataset.fingerprint"] == summary["fingerprint"]
    assert run.data.params["train.steps"] == "12" and run.data.params["model.base_channels"] == "8"
    assert run.data.params["data.source"] == "digits"
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert [m.step for m in losses] == [4, 8, 12]
    assert {"lr", "grad_norm", "images_per_second", "ema_decay"} <= set(run.data.metrics)
    assert run.inputs.dataset_inputs[0].dataset.digest == summary["fingerprint"][:32]

    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/noise_schedule.png"}
    samples = [a.path for a in client.list_artifacts(summary["run_id"], "samples")]
    assert "samples/samples-0000012-ddim-5-eta1.png" in samples

    assert [p.rsplit("/", 1)[-1] for p in summary["checkpoints"]] == ["step-0000006.pt", "step-0000012.pt"]
    import numpy as np
    images = np.load(summary["samples"]["npz"])["images"]
    assert images.shape == (8, 1, 16, 16) and images.dtype == np.uint8

    # FID against the holdout split, with the floor at the same sample count beside it
    evaluation = summary["evaluation"]
    assert evaluation["metric"] == "fid_classifier" and evaluation["num_samples"] == 8
    assert run.data.metrics["fid_classifier"] == pytest.approx(evaluation["fid_classifier"])
    assert 0 < evaluation["fid_classifier_floor"] < evaluation["fid_classifier"]  # 12 steps of training is bad
    assert sum(evaluation["class_histogram"]) == 8 and 0.1 <= evaluation["sample_confidence"] <= 1.0
    assert evaluation["classifier_accuracy"] > 0.8
    assert [a.path for a in client.list_artifacts(summary["run_id"], "evaluation")] == [
        "evaluation/class_histogram-0000012.png"]


def test_a_failing_pipeline_marks_its_mlflow_run_failed(prefect_harness, mlflow_store):
    from flows.train_pipeline import train_pipeline

    # a model for 32x32 RGB images cannot train on 16x16 gray digits: a clear error, a FAILED run
    state = train_pipeline(data=DataConfig(source="digits", max_images=50), model=preset("ddpm-cifar10"),
                           train=TINY_TRAIN, sampling=TINY_SAMPLING, experiment="pipeline-fail", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="16x16x1|image size|channels"):
        state.result()
    runs = mlflow.search_runs(experiment_names=["pipeline-fail"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]

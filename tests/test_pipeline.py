"""train_pipeline end to end on a real (temporary) Prefect server and a real MLflow sqlite store."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ddpm.data import DataConfig
from ddpm.metrics import inception_available
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import preset

TINY_TRAIN = TrainConfig(steps=12, batch_size=16, warmup_steps=2, log_every=4, checkpoint_every=6, keep_last=2,
                         ema_decay=0.99, learning_rate=1e-3)
TINY_SAMPLING = SamplerConfig(sampler="ddim", num_steps=5, num_images=8, batch_size=8)
TINY_MODEL = preset("tiny-16", base_channels=8, num_groups=4)


@pytest.mark.slow
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
    # a grid from each checkpoint for the UI's image slider: the model learning, step by step
    images = [a.path.rsplit("/", 1)[-1].split("+") for a in client.list_artifacts(summary["run_id"], "images")]
    assert sorted(int(name[2]) for name in images if name[0] == "progress" and name[-1].endswith(".png")) == [6, 12]

    assert [p.rsplit("/", 1)[-1] for p in summary["checkpoints"]] == ["step-0000006.pt", "step-0000012.pt"]
    import numpy as np
    images = np.load(summary["samples"]["npz"])["images"]
    assert images.shape == (8, 1, 16, 16) and images.dtype == np.uint8

    # FID against the holdout split, with the floor at the same sample count beside it: the standard
    # (Inception, the primary metric) when the extra is installed, and the classifier's (labels exist)
    evaluation = summary["evaluation"]
    metrics = (["fid_inception"] if inception_available() else []) + ["fid_classifier"]
    assert evaluation["metrics"] == metrics and evaluation["metric"] == metrics[0] and evaluation["num_samples"] == 8
    assert run.data.tags["fid.metric"] == metrics[0] and run.data.tags["fid.num_samples"] == "8"
    for name in metrics:
        assert run.data.metrics[name] == pytest.approx(evaluation[name])
        assert 0 < evaluation[f"{name}_floor"] < evaluation[name]  # 12 steps of training is bad
    assert sum(evaluation["class_histogram"]) == 8 and 0.1 <= evaluation["sample_confidence"] <= 1.0
    assert evaluation["classifier_accuracy"] > 0.8
    assert [a.path for a in client.list_artifacts(summary["run_id"], "evaluation")] == [
        "evaluation/class_histogram-0000012.png"]

    # the run's model is logged (the run page shows it before any promotion), its FIDs linked to it
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.model_id == summary["model_id"] and model.source_run_id == summary["run_id"]
    assert model.tags["checkpoint.step"] == "12"
    assert {m.key for m in model.metrics} >= set(metrics)
    # ... and promotion registers that model instead of logging another
    from tasks.registry import promote_best

    promotion = promote_best("pipeline-test", "pipeline-test-model")
    version = client.get_model_version("pipeline-test-model", promotion["version"])
    assert version.source == f"models:/{summary['model_id']}"
    assert len(client.search_logged_models([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_a_failing_pipeline_marks_its_mlflow_run_failed(prefect_harness, mlflow_store, tmp_path):
    from flows.train_pipeline import train_pipeline

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "runs").write_text("a file where the run folders go")   # fails once the run exists
    state = train_pipeline(data=DataConfig(source="digits", max_images=50), model=TINY_MODEL,
                           train=TINY_TRAIN, sampling=TINY_SAMPLING, experiment="pipeline-fail", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="runs"):
        state.result()
    (run,) = mlflow.search_runs(experiment_names=["pipeline-fail"], output_format="list")
    assert run.info.status == "FAILED" and "runs" in run.data.tags["error"]


@pytest.mark.slow
@pytest.mark.skipif(not inception_available(), reason="the inception extra is not installed")
def test_an_unlabelled_image_folder_gets_the_standard_fid(prefect_harness, mlflow_store, tmp_path):
    """A folder of images without class sub-folders has no labels, so no classifier: fid_inception only."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from flows.train_pipeline import train_pipeline

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, image in enumerate(load_digits().images[:60]):
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{i:03d}.png")
    state = train_pipeline(data=DataConfig(source=f"folder:{folder}"), model=TINY_MODEL, train=TINY_TRAIN,
                           sampling=TINY_SAMPLING, experiment="unlabelled", return_state=True)
    assert state.is_completed()
    evaluation = state.result()["evaluation"]
    assert evaluation["metrics"] == ["fid_inception"] and "fid_classifier" not in evaluation
    run = MlflowClient(mlflow_store).get_run(state.result()["run_id"])
    assert run.data.tags["fid.metric"] == "fid_inception"
    assert run.data.metrics["fid_inception"] == pytest.approx(evaluation["fid_inception"])
    assert evaluation["fid_inception"] > 0
    assert "fid_classifier" not in run.data.metrics


@pytest.mark.slow
def test_checks_that_can_run_before_training_do(prefect_harness, mlflow_store):
    """More samples than reference images, a model for other images: refused before the MLflow run
    exists or anything trains."""
    from flows.train_pipeline import train_pipeline

    state = train_pipeline(data=DataConfig(source="digits", max_images=50), model=preset("ddpm-cifar10"),
                           train=TINY_TRAIN, sampling=TINY_SAMPLING, experiment="too-many", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="the data is 16x16 with 1 channel.* but the model takes 32x32 with 3"):
        state.result()

    state = train_pipeline(data=DataConfig(source="digits", max_images=50), model=TINY_MODEL, train=TINY_TRAIN,
                           sampling=TINY_SAMPLING.model_copy(update={"num_images": 11}), experiment="too-many",
                           return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="has 10 images, fewer than the 11 samples"):
        state.result()
    assert MlflowClient(mlflow_store).get_experiment_by_name("too-many") is None

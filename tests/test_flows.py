"""compare_schedules, evaluate and retrain on the session's temporary Prefect server, tiny settings.

One tiny training run (module fixture) serves the evaluate and retrain tests; the MLflow store
and DDPM_HOME live in a temp folder of this module.
"""

import re
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ddpm.data import DataConfig
from ddpm.samplers import SamplerConfig
from ddpm.training import TrainConfig
from ddpm.unet import preset

TINY_DATA = DataConfig(source="digits", max_images=200)
TINY_TRAIN = TrainConfig(steps=10, batch_size=16, warmup_steps=2, log_every=5, checkpoint_every=5, keep_last=2,
                         ema_decay=0.99, learning_rate=1e-3, posthoc_ema=True, posthoc_ema_snapshots=5)
TINY_SAMPLING = SamplerConfig(sampler="ddim", num_steps=5, num_images=8, batch_size=8)
TINY_MODEL = preset("tiny-16", base_channels=8, num_groups=4)
TINY = dict(data=TINY_DATA, model=TINY_MODEL, train=TINY_TRAIN, sampling=TINY_SAMPLING)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow sqlite store and a DDPM_HOME for this module."""
    root = tmp_path_factory.mktemp("flows")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("DDPM_HOME", str(root / "home"))
        yield uri


@pytest.fixture(scope="module")
def trained(prefect_harness, store):
    """One tiny finished train_pipeline run: (summary, Prefect flow-run id)."""
    from flows.train_pipeline import train_pipeline

    state = train_pipeline(**TINY, experiment="flows-test", return_state=True)
    assert state.is_completed()
    return state.result(), str(state.state_details.flow_run_id)


def failure_of(state) -> str:
    assert state.is_failed()
    with pytest.raises(Exception) as error:
        state.result()
    return str(error.value)


# --- evaluate -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_logs_a_fid_curve_into_the_training_run(trained, store):
    from flows.evaluate import evaluate

    summary, flow_run_id = trained
    metric = summary["evaluation"]["metric"]   # fid_inception with the extra installed, else fid_classifier
    client = MlflowClient(store)
    before = [(m.step, m.value) for m in client.get_metric_history(summary["run_id"], metric)]
    assert [step for step, _ in before] == [10]   # the pipeline's own FID, last checkpoint only

    # the form a deployment trigger passes: the event's resource id
    result = evaluate(prefect_flow_run_id=f"prefect.flow-run.{flow_run_id}")
    assert result["run_id"] == summary["run_id"] and result["metric"] == metric
    assert sorted(result["fids"]) == [5, 10]
    assert result["posthoc_ema"]["rows"]   # the run kept post-hoc EMA snapshots: swept without asking

    run = client.get_run(summary["run_id"])
    history = client.get_metric_history(summary["run_id"], metric)
    assert sorted(m.step for m in history) == [5, 10, 10]
    # same checkpoint, same sampling settings and seed: the same FID as the pipeline measured
    assert result["fids"][10] == pytest.approx(before[0][1], rel=1e-4)
    assert run.data.tags["fid.best_step"] == str(result["best_step"])
    assert result["best_step"] == min(result["fids"], key=result["fids"].get)
    assert run.info.status == "FINISHED"
    # a sample grid per checkpoint step: the MLflow UI's image slider over training
    images = [a.path for a in client.list_artifacts(summary["run_id"], "images")]
    assert {step for step in (5, 10) if any(f"+step+{step}+" in path for path in images)} == {5, 10}, images


@pytest.mark.slow
def test_evaluate_by_another_protocol_keeps_the_runs_comparability(trained, store):
    """A partial `sampling` changes only what it names of the run's own settings; measured another
    way, the FIDs go under names that say how and fid.metric / fid.num_samples / fid.sampler stay."""
    from flows.evaluate import evaluate

    summary, _ = trained
    client = MlflowClient(store)
    before = client.get_run(summary["run_id"]).data
    result = evaluate(mlflow_run_id=summary["run_id"], sampling={"sampler": "ddim", "num_steps": 3})
    after = client.get_run(summary["run_id"]).data
    assert result["protocol"].startswith("evaluate.ddim-3-eta1-n")
    for tag in ("fid.metric", "fid.num_samples", "fid.sampler", "fid.best_step"):
        assert after.tags.get(tag) == before.tags.get(tag), tag
    assert after.metrics[summary["evaluation"]["metric"]] == before.metrics[summary["evaluation"]["metric"]]
    renamed = [key for key in after.metrics if key.startswith(result["protocol"] + ".fid_")]
    assert renamed and f"n{before.tags['fid.num_samples']}." in result["protocol"] + "."   # the run's own count


@pytest.mark.slow
def test_evaluate_refuses_bad_requests_and_writes_nothing(trained, store):
    from flows.evaluate import evaluate
    from tasks import tracking

    summary, _ = trained
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("flows-test").experiment_id
    empty = client.create_run(experiment_id, run_name="no-checkpoints").info.run_id

    def snapshot():
        runs = client.search_runs([experiment_id])
        return {r.info.run_id: (r.data.metrics, r.data.tags, r.info.status) for r in runs}

    before = snapshot()
    with pytest.raises(tracking.RunNotFoundError, match="no MLflow run with id '0+'"):
        evaluate(mlflow_run_id="0" * 32)
    missing = str(uuid.uuid4())
    with pytest.raises(tracking.RunNotFoundError, match=f"tagged with Prefect flow run '{missing}'"):
        evaluate(prefect_flow_run_id=f"prefect.flow-run.{missing}")
    with pytest.raises(FileNotFoundError, match=f"run {empty} has no checkpoints"):
        evaluate(mlflow_run_id=empty)
    with pytest.raises(ValueError, match="exactly one"):
        evaluate()
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(mlflow_run_id=summary["run_id"], prefect_flow_run_id=str(uuid.uuid4()))
    # post-hoc EMA requests that cannot be met: before any sampling
    from ddpm.posthoc_ema import PosthocEMAError
    with pytest.raises(PosthocEMAError, match=r"no post-hoc EMA snapshot at step\(s\) \[3\] .* its snapshots: "
                                              r"\[2, 4, 6, 8, 10\]"):
        evaluate(mlflow_run_id=summary["run_id"], posthoc_ema=True, posthoc_steps=[3])
    with pytest.raises(PosthocEMAError, match="sigma_rel 0.5 is outside"):
        evaluate(mlflow_run_id=summary["run_id"], posthoc_ema=True, posthoc_sigma_rels=[0.05, 0.5])
    with pytest.raises(ValueError, match="measures with the run's own sampling and FID extractor"):
        evaluate(mlflow_run_id=summary["run_id"], posthoc_ema=True, sampling={"num_steps": 3})
    assert snapshot() == before


@pytest.mark.slow
def test_evaluate_posthoc_ema_logs_the_width_curve_and_promotion_registers_the_chosen_reconstruction(trained, store):
    """The sweep's table, plot and best FID on the run; the choice against the run's own EMA; a
    reconstruction chosen is a logged model of the run that `promote` registers (its weights, its
    width on the version)."""
    import json
    from pathlib import Path

    import torch

    from ddpm.checkpoint import load_checkpoint
    from flows.evaluate import evaluate
    from tasks import contract
    from tasks.posthoc import log_posthoc_sweep
    from tasks.registry import champion_bundle, promote_best

    summary, _ = trained
    run_id, client = summary["run_id"], MlflowClient(store)
    result = evaluate(mlflow_run_id=run_id, posthoc_ema=True, posthoc_sigma_rels=[0.05, 0.1, 0.2])["posthoc_ema"]
    metric = result["metric"]
    rows = result["rows"]
    assert [(r["sigma_rel"], r["step"]) for r in rows] == [(0.05, 10), (0.1, 10), (0.2, 10)]
    run = client.get_run(run_id)
    table = json.loads(Path(client.download_artifacts(run_id, contract.POSTHOC_TABLE)).read_text())
    # 5 snapshots reconstruct widths ~0.04-0.13: 0.2 is skipped with the reason, the others scored
    assert "cannot be reconstructed" in rows[2]["skipped"] and "choose sigma_rel within" in rows[2]["skipped"]
    assert [row[0] for row in table["data"]] == [0.05, 0.1]
    assert "posthoc_ema.png" in [a.path.split("/")[-1] for a in client.list_artifacts(run_id, "plots")]
    best = min(rows[:2], key=lambda r: r[metric])
    assert run.data.metrics[f"posthoc_ema.{metric}_best"] == pytest.approx(best[metric])
    fixed = run.data.metrics[f"posthoc_ema.fixed_{metric}"]
    assert run.data.tags["posthoc_ema.chosen"] == ("reconstruction" if best[metric] < fixed else "fixed")

    # against a run's own EMA that scores worse at the same step the best reconstruction is chosen:
    # promotion registers it
    choice = log_posthoc_sweep.fn(run_id, rows, {10: float("inf")}, 0.99)
    assert choice["chosen"] == "reconstruction"
    promoted = promote_best("flows-test", model_name="posthoc-test", log=lambda _: None)
    assert promoted["run_id"] == run_id
    version = client.get_model_version("posthoc-test", promoted["version"])
    assert version.tags["posthoc_ema.sigma_rel"] == f"{best['sigma_rel']:g}"
    served = load_checkpoint(champion_bundle("posthoc-test", promoted["version"]))["model"]
    reconstructed = load_checkpoint(best["checkpoint"])["model"]
    assert all(torch.equal(served[k], reconstructed[k]) for k in reconstructed)


# --- compare_schedules --------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_schedules_trains_child_runs_on_a_local_dask_cluster_and_logs_a_table(prefect_harness, store):
    """The two pipelines run in the two worker processes of a real local Dask cluster."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.compare_schedules import TABLE_COLUMNS, compare_schedules

    table = compare_schedules(schedules=["linear", "cosine"], num_timesteps=200, **TINY,
                              experiment="compare-test", max_parallel=2, promote_to="compare-test-model",
                              dask_cluster="local", fid_extractor="classifier")   # Inception: 1 thread each, slow
    assert list(table.columns) == TABLE_COLUMNS
    assert sorted(table.schedule) == ["cosine", "linear"]
    assert list(table.fid) == sorted(table.fid) and (table.fid > table.fid_floor).all()
    assert (table.steps == 10).all() and (table.images_per_second > 0).all()

    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("compare-test").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    parents = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["schedule"] for r in children) == ["cosine", "linear"]
    assert set(table.run_id) == {r.info.run_id for r in children}
    for child in children:   # everything but the schedule is equal, the seed included
        assert child.info.status == "FINISHED"
        assert child.data.params["train.seed"] == "0" and child.data.params["sampling.seed"] == "0"
        assert child.data.params["diffusion.num_timesteps"] == "200"
    pids = {child.data.tags["ddpm.pid"] for child in children}
    assert str(os.getpid()) not in pids and len(pids) == 2   # each in its own Dask worker process
    assert {k: v for k, v in children[0].data.params.items() if k != "diffusion.schedule"} == \
           {k: v for k, v in children[1].data.params.items() if k != "diffusion.schedule"}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["comparison.best_schedule"] == table.schedule[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "plots"} <= artifacts
    # beside the FID table, each schedule's precision against its recall (fidelity against diversity)
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/precision_recall.png",
                                                                                     "plots/schedules.png"]
    assert table.precision.between(0, 1).all() and table.recall.between(0, 1).all() and table.kid_std.gt(0).all()
    for child in children:   # each run logs every measure it can, KID with its spread
        assert {"kid_classifier", "kid_classifier_std", "precision_classifier", "recall_classifier",
                "precision_classifier_floor"} <= set(child.data.metrics)
    # the comparison ends by promoting its best schedule's run: the first champion of a new model
    champion = client.get_model_version_by_alias("compare-test-model", "champion")
    assert champion.run_id == table.run_id[0] and champion.tags["schedule"] == table.schedule[0]

    import asyncio

    async def read_table_artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["schedule-comparison"])))

    artifacts = asyncio.run(read_table_artifacts())
    assert artifacts and artifacts[0].type == "table"
    assert parent.info.run_id in artifacts[0].description


@pytest.mark.parametrize("schedules, message", [
    ([], "at least 1 item"),
    (["linear", "wobbly"], "unknown noise schedule.*wobbly"),
    (["cosine", "cosine"], "repeat"),
])
@pytest.mark.slow
def test_compare_schedules_rejects_bad_lists_before_any_run(prefect_harness, store, schedules, message):
    from flows.compare_schedules import compare_schedules

    state = compare_schedules(schedules=schedules, **TINY, experiment="compare-bad", return_state=True)
    assert re.search(message, failure_of(state), re.IGNORECASE | re.DOTALL)
    assert MlflowClient(store).get_experiment_by_name("compare-bad") is None


@pytest.mark.slow
def test_compare_schedules_without_prefect_dask_says_so_before_any_run(prefect_harness, store, monkeypatch):
    """prefect-dask is installed here; a None entry in sys.modules makes its import fail as if it were not."""
    import sys

    from flows.compare_schedules import compare_schedules

    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    state = compare_schedules(schedules=["linear"], **TINY, experiment="compare-no-dask", dask_cluster="local",
                              return_state=True)
    assert "needs prefect-dask, which is not installed: pip install 'ddpm-pipeline[dask]'" in failure_of(state)
    state = compare_schedules(schedules=["linear"], **TINY, experiment="compare-no-dask",
                              dask_cluster="http://scheduler:8786", return_state=True)   # not a Dask address
    assert "dask_cluster" in failure_of(state)
    assert MlflowClient(store).get_experiment_by_name("compare-no-dask") is None


# --- retrain ------------------------------------------------------------------------------------

def test_best_run_config_is_none_without_runs(store):
    from flows.retrain import best_run_config

    assert best_run_config("no-such-experiment") is None


@pytest.mark.slow
def test_retrain_uses_the_best_runs_configuration(trained, store):
    from flows.retrain import best_run_config, retrain

    summary, _ = trained
    metric = summary["evaluation"]["metric"]   # fid_inception with the extra installed, else fid_classifier
    best_id, ranked_by, config = best_run_config("flows-test")
    assert best_id == summary["run_id"] and ranked_by == metric and config.model.base_channels == 8

    skipped = retrain(experiment="flows-test", promote_to="retrain-test-model")   # nothing changed: no training
    assert skipped["decision"] == "skipped" and skipped["based_on"] == summary["run_id"]
    result = retrain(experiment="flows-test", promote_to="retrain-test-model", force=True)
    assert result["decision"] == "scratch" and "no champion to start from" in result["reason"]
    assert result["based_on"] == summary["run_id"] and result["run_id"] != summary["run_id"]
    assert result["dataset"] == summary["dataset"]   # unchanged data: the same prepared folder
    run = MlflowClient(store).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["retrain.based_on"] == summary["run_id"]
    assert run.data.params["train.steps"] == "10" and run.data.params["model.base_channels"] == "8"
    assert {metric, "fid_classifier"} <= set(run.data.metrics)
    # ... and ends by promoting the best run of the experiment (no champion yet: it becomes one)
    promotion = result["promotion"]
    scored = [r for r in MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("flows-test").experiment_id],
        f"attributes.status = 'FINISHED' and tags.`fid.metric` = '{metric}'")]
    assert result["run_id"] in {r.info.run_id for r in scored}
    # ranked by the model each run ships: a post-hoc reconstruction evaluate chose scores its own number
    shipped = lambda r: r.data.metrics[f"posthoc_ema.{metric}_best"] \
        if r.data.tags.get("posthoc_ema.chosen") == "reconstruction" else r.data.metrics[metric]  # noqa: E731
    best = min(scored, key=shipped).info.run_id
    assert promotion["run_id"] == best and promotion["moved"] is True
    assert MlflowClient(store).get_model_version_by_alias("retrain-test-model", "champion").run_id == best


@pytest.mark.slow
def test_a_run_ranking_by_kid_says_so_and_evaluate_keeps_its_measure(prefect_harness, store):
    """rank_by: the run's primary metric (fid.metric) is KID, ranked lower-is-better; evaluate's
    best step follows it, and promote compares such runs only with runs ranked the same way."""
    from flows.evaluate import evaluate
    from flows.train_pipeline import train_pipeline

    summary = train_pipeline(**{**TINY, "fid_extractor": "classifier"}, rank_by="kid", experiment="rank-by-kid")
    client = MlflowClient(store)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["fid.metric"] == "kid_classifier" == summary["evaluation"]["metric"]
    assert {"fid_classifier", "kid_classifier", "kid_classifier_std"} <= set(run.data.metrics)
    result = evaluate(mlflow_run_id=summary["run_id"], posthoc_ema=False)
    assert result["metric"] == "kid_classifier"
    assert result["best_step"] == min(result["fids"], key=result["fids"].get)
    assert client.get_run(summary["run_id"]).data.tags["fid.metric"] == "kid_classifier"

"""The protocol as one value (tasks.contract.Protocol) and its readers: runs ranked in their metric's
direction, only alike; the champion decision; one seed refused without a margin; a post-hoc EMA
compared at its own step; a registered version tagged with what it holds. Real MLflow stores."""

from __future__ import annotations

import time

import pytest
from mlflow.entities import Metric

from tasks import contract, tracking
from tasks.contract import Protocol
from trained_runs import fake_trained_run, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def log(client, run_id: str, values: dict, step: int = 2) -> None:
    client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), step) for k, v in values.items()])


def test_the_protocol_reads_and_writes_todays_tags():
    tags = {"fid.metric": "fid_inception", "dataset.fingerprint": "abc", "fid.num_samples": "500",
            "model.conditional": "true", "fid.sampler": "ddim-50", "schedule": "linear"}
    protocol = Protocol.from_tags(tags)
    assert protocol.tags() == {k: v for k, v in tags.items() if k != "schedule"}   # the same names, the same values
    assert Protocol.from_tags(protocol.tags()) == protocol
    # a run from before the kind and the sampler were tagged: unconditional, no sampler, read as it was
    old = Protocol.from_tags({"fid.metric": "fid_classifier", "dataset.fingerprint": "abc", "fid.num_samples": "500"})
    assert (old.conditional, old.sampler) == ("false", None) and "fid.sampler" not in old.tags()
    assert protocol.difference(Protocol.from_tags({**tags, "fid.num_samples": "300"})) == \
        "another sample count (fid.num_samples '300' vs '500')"
    assert protocol.difference(Protocol.from_tags(tags, metric="kid_inception")).startswith("another metric")
    assert Protocol.from_tags(tags, metric="precision_inception").rank([0.2, 0.9, 0.5]) == [0.9, 0.5, 0.2]
    assert protocol.rank([3.0, 1.0, 2.0]) == [1.0, 2.0, 3.0]


def test_runs_are_ranked_in_their_metrics_direction_and_only_alike(mlflow_store, checkpoint):
    client = tracking.client()
    values = {"a": (30.0, 0.020, 0.50), "b": (20.0, 0.030, 0.80), "c": (25.0, 0.010, 0.60)}
    ids = {}
    for name, (fid, kid, precision) in values.items():
        ids[name] = run_id = fake_trained_run(client, "exp", checkpoint, fid)
        client.update_run(run_id, status="RUNNING")   # log more, then finish again
        log(client, run_id, {"kid_classifier": kid, "precision_classifier": precision})
        client.set_terminated(run_id)
        time.sleep(0.01)
    other = fake_trained_run(client, "exp", checkpoint, 1.0, num_samples=300)   # another sample count: never ranked
    from tasks.registry import comparable_runs

    order = lambda metric: [r.info.run_id for r in comparable_runs("exp", metric, num_samples=500)[0]]  # noqa: E731
    assert order("fid_classifier") == [ids["b"], ids["c"], ids["a"]]        # lower wins
    assert order("kid_classifier") == [ids["c"], ids["a"], ids["b"]]        # lower wins
    assert order("precision_classifier") == [ids["b"], ids["c"], ids["a"]]  # higher wins
    runs, protocol = comparable_runs("exp", "kid_classifier", num_samples=500)
    assert protocol.metric == "kid_classifier" and protocol.num_samples == "500" and other not in order("fid_classifier")
    with pytest.raises(ValueError, match="unknown metric 'kid'"):
        comparable_runs("exp", "kid")


def test_the_champion_decision_by_logged_scores_reads_the_direction():
    from tasks.registry import champion_decision

    tags = {"fid.metric": "precision_inception", "dataset.fingerprint": "abc", "fid.num_samples": "500"}
    moved, reason = champion_decision({**tags, "fid": "0.8"}, {**tags, "fid": "0.7"})
    assert moved, reason   # a higher precision is better
    moved, reason = champion_decision({**tags, "fid": "0.6"}, {**tags, "fid": "0.7"})
    assert not moved and "worse" in reason
    moved, reason = champion_decision({**tags, "fid": "0.9"}, {**tags, "fid.metric": "fid_inception", "fid": "9"})
    assert not moved and "another metric" in reason and "not comparable" in reason


def test_one_seed_is_refused_unless_a_margin_is_given(mlflow_store, capsys):
    from flows.cli import main
    from tasks.registry import ChallengeRule, noise_aware_decision

    with pytest.raises(ValueError, match="1 seed measures no noise"):
        ChallengeRule(seeds=1)
    assert ChallengeRule(seeds=1, min_margin=0.5).seeds == 1
    moved, reason, numbers = noise_aware_decision([10.0], [11.0], min_margin=0.5)
    assert moved and "noise margin" not in reason and "minimum margin 0.5 (one seed: no noise measured)" in reason
    moved, reason, _ = noise_aware_decision([10.0], [10.3], min_margin=0.5)
    assert not moved and "tie within the minimum margin" in reason
    # the command refuses it in one line, before anything runs
    assert main(["promote", "--seeds", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 seed measures no noise" in err and "min_margin" in err, err


def test_the_head_to_head_decision_reads_the_direction():
    from tasks.registry import noise_aware_decision

    better = [0.82, 0.80, 0.81]
    worse = [0.70, 0.69, 0.71]
    assert noise_aware_decision(better, worse, lower_is_better=False)[0]       # higher precision wins
    assert not noise_aware_decision(worse, better, lower_is_better=False)[0]
    assert not noise_aware_decision(better, worse, lower_is_better=True)[0]   # as a distance, it would lose
    moved, reason, _ = noise_aware_decision([10.0, 12.0, 11.0], [10.5, 11.0, 12.0])
    assert not moved and "tie within the noise margin" in reason


def test_a_posthoc_reconstruction_meets_the_runs_ema_at_its_own_step(mlflow_store, checkpoint):
    from ddpm.posthoc_ema import PosthocEMAError
    from tasks.posthoc import log_posthoc_sweep

    client = tracking.client()
    run_id = fake_trained_run(client, "exp", checkpoint, 20.0)
    rows = [{"sigma_rel": s, "step": 50, "checkpoint": str(checkpoint), "profile_error": 0.01,
             "metric": "fid_classifier", "fid_classifier": v, "kid_classifier": v / 1000}
            for s, v in ((0.05, 9.0), (0.10, 8.0))]
    # the run's EMA at 60 (20.0) is worse than the best reconstruction at 50 (8.0), but its EMA at 50 (5.0) is better:
    # compared at the same step, the run's own EMA stays its model
    choice = log_posthoc_sweep.fn(run_id, rows, {50: 5.0, 60: 20.0}, ema_decay=0.999)
    assert choice["chosen"] == "fixed" and choice["fixed"] == 5.0 and choice["fixed_step"] == 50
    run = client.get_run(run_id)
    assert run.data.tags[contract.POSTHOC_CHOSEN_TAG] == "fixed"
    assert run.data.metrics["posthoc_ema.fixed_fid_classifier"] == 5.0
    assert run.data.metrics["posthoc_ema.kid_classifier_best"] == 0.008   # every measure of the best width
    # no checkpoint of the run's EMA at the reconstruction's step: refused, nothing chosen
    other = fake_trained_run(client, "exp", checkpoint, 20.0)
    with pytest.raises(PosthocEMAError, match=r"at step 50, where the run has no checkpoint of its own EMA.*\[60\]"):
        log_posthoc_sweep.fn(other, rows, {60: 20.0}, ema_decay=0.999)
    assert contract.POSTHOC_CHOSEN_TAG not in client.get_run(other).data.tags


@pytest.mark.slow   # registers a model
def test_a_version_from_a_reconstruction_carries_its_own_score_step_and_width(mlflow_store, checkpoint):
    from tasks.registry import promote_best

    client = tracking.client()
    plain = fake_trained_run(client, "exp", checkpoint, 10.0)   # its own EMA: 10
    chosen = fake_trained_run(client, "exp", checkpoint, 12.0)  # its own EMA: 12, its reconstruction: 8
    client.update_run(chosen, status="RUNNING")
    log(client, chosen, {"posthoc_ema.fid_classifier_best": 8.0}, step=2)
    for key, value in {contract.POSTHOC_CHOSEN_TAG: "reconstruction", contract.POSTHOC_SIGMA_REL_TAG: "0.05",
                       contract.POSTHOC_STEP_TAG: "2", contract.POSTHOC_CHECKPOINT_TAG: str(checkpoint)}.items():
        client.set_tag(chosen, key, value)
    client.set_terminated(chosen)
    result = promote_best("exp", "ddpm", log=lambda *a: None)
    assert result["run_id"] == chosen and result["fid"] == 8.0   # ranked by what it ships, not its EMA's 12
    tags = client.get_model_version("ddpm", result["version"]).tags
    assert tags["fid"] == "8.0" and tags[contract.LOGGED_STEP_TAG] == "2"
    assert tags[contract.POSTHOC_SIGMA_REL_TAG] == "0.05" and tags["fid.metric"] == "fid_classifier"
    assert plain != chosen

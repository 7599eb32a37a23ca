"""The retraining loop's decisions: what retrain does when nothing, the data or the configuration
changed, and when a challenger beats the champion (beyond FID's noise)."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import contract
from tasks.config import DEFAULTS


def reference(fingerprint="data-1", config=DEFAULTS, champion="1"):
    run = SimpleNamespace(info=SimpleNamespace(run_id="run-1"),
                          data=SimpleNamespace(tags={contract.DATASET_FINGERPRINT_TAG: fingerprint}))
    return run, config, (SimpleNamespace(version=champion) if champion else None)


def test_retrain_skips_when_nothing_changed_and_says_why():
    from flows.retrain import retrain_decision

    decision, reason = retrain_decision(reference(), DEFAULTS, "data-1", "champion", force=False)
    assert decision == "skipped" and "nothing changed" in reason and "champion version 1" in reason
    # where it trains, and how a warm start began, are not the configuration
    elsewhere = DEFAULTS.with_settings({"train.device": "cuda", "train.num_processes": 4,
                                        "train.init_from": "/somewhere/step-0000100.pt"})
    assert retrain_decision(reference(), elsewhere, "data-1", "champion", force=False)[0] == "skipped"
    # force trains anyway, from the champion's weights
    assert retrain_decision(reference(), DEFAULTS, "data-1", "champion", force=True) == (
        "warm-start", "forced, nothing changed: starting from champion version 1 (run run-1)'s weights")


def test_retrain_warm_starts_on_new_data_and_trains_from_scratch_on_a_new_configuration():
    from flows.retrain import retrain_decision

    decision, reason = retrain_decision(reference(), DEFAULTS, "data-2", "champion", force=False)
    assert decision == "warm-start" and "the data changed" in reason
    assert retrain_decision(reference(), DEFAULTS, "data-2", "scratch", force=False)[0] == "scratch"
    assert retrain_decision(reference(champion=None), DEFAULTS, "data-2", "champion", force=False) == (
        "scratch", "the data changed (data-1 -> data-2); no champion to start from")
    longer = DEFAULTS.with_settings({"train.steps": 3000, "model.dropout": 0.1})
    decision, reason = retrain_decision(reference(), longer, "data-1", "champion", force=False)
    assert decision == "scratch" and "train.steps" in reason and "model.dropout" in reason
    assert retrain_decision(None, DEFAULTS, "data-1", "champion", force=False)[0] == "scratch"
    # a challenger of this data and configuration already lost to this champion: not trained again
    decision, reason = retrain_decision(reference(), DEFAULTS, "data-2", "champion", force=False, tried="run-7")
    assert decision == "skipped" and "already tried: run run-7" in reason
    assert retrain_decision(reference(), DEFAULTS, "data-2", "champion", force=True, tried="run-7")[0] == "warm-start"


def test_class_differences_are_said_by_name():
    from flows.retrain import class_difference
    from tasks.data import class_names_tag

    digits = [str(i) for i in range(10)]
    assert class_difference(digits, list(digits)) is None
    assert class_difference(digits, digits[:3] + digits[4:]) == "removed '3'; 6 other class(es) at another label"
    assert class_difference(digits, sorted(digits + ["10"])) == "added '10'; 8 other class(es) at another label"
    assert class_difference(["cat", "dog"], ["cat", "hound"]) == "removed 'dog'; added 'hound'"
    assert class_difference(None, ["a"]) == "it had no labels, the data has 1 classes"
    assert class_difference(["a", "b"], None) == "it had 2 classes, the data has no labels"
    many = [f"class-{i:04d}" for i in range(1000)]   # longer than a tag holds: recorded by count and hash
    recorded = json.loads(class_names_tag(many))
    assert set(recorded) == {"count", "sha256"} and class_difference(recorded, list(many)) is None
    assert class_difference(recorded, many[:-1]) == "the names of its 1000 classes are not the data's 999"


def test_a_removed_class_folder_trains_a_conditional_model_from_scratch_with_the_datas_classes(tmp_path, mlflow_store):
    """Real folders, a real MLflow run tagged by log_dataset_input: remove `3/` and `4/` would become
    class 3. A class-conditional champion is never warm-started on it; the new model takes the data's
    class count (a new class must not fail every night with 'set num_classes=11')."""
    from mlflow.tracking import MlflowClient

    from ddpm.data import DataConfig, load_prepared, prepare_dataset, validate_for_model
    from flows.retrain import retrain_decision, with_data_classes
    from tasks.data import DATASET_CLASS_NAMES_TAG, log_dataset_input

    folder = tmp_path / "incoming"
    write_digits(folder, range(0, 150))
    config = DEFAULTS.with_settings({"data.source": f"folder:{folder}", "data.image_size": 8,
                                     "model.num_classes": 10})
    before = load_prepared(prepare_dataset(config.data, tmp_path / "data"))
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("classes", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    log_dataset_input(run_id, before)
    run = client.get_run(run_id)
    assert json.loads(run.data.tags[DATASET_CLASS_NAMES_TAG]) == [str(i) for i in range(10)]
    champion = SimpleNamespace(version="1")

    # the folder grows, same classes: a warm start, as before
    write_digits(folder, range(150, 200))
    grown = load_prepared(prepare_dataset(config.data, tmp_path / "data")).manifest
    assert with_data_classes(config, grown["class_names"]) == config
    assert retrain_decision((run, config, champion), config, grown["fingerprint"], "champion", False,
                            class_names=grown["class_names"])[0] == "warm-start"

    import shutil
    shutil.rmtree(folder / "3")
    removed = load_prepared(prepare_dataset(config.data, tmp_path / "data"))
    nine = with_data_classes(config, removed.manifest["class_names"])
    assert nine.model.num_classes == 9
    validate_for_model(removed, 8, 1, nine.model.num_classes)
    decision, reason = retrain_decision((run, config, champion), nine, removed.fingerprint, "champion", False,
                                        class_names=removed.manifest["class_names"])
    assert decision == "scratch" and "\n" not in reason
    assert reason.startswith(f"the classes changed against champion version 1 (run {run_id}) (removed '3'; "
                             "6 other class(es) at another label)")
    # ... even when it was forced, and even when only a name changed
    assert retrain_decision((run, config, champion), nine, removed.fingerprint, "champion", True,
                            class_names=removed.manifest["class_names"])[0] == "scratch"
    (folder / "9").rename(folder / "nine")
    renamed = load_prepared(prepare_dataset(config.data, tmp_path / "data")).manifest
    assert "removed '3', '9'; added 'nine'" in retrain_decision((run, config, champion), nine, renamed["fingerprint"],
                                                           "champion", False, class_names=renamed["class_names"])[1]

    # a class added: eleven classes, from scratch (not a DataError asking for num_classes=11)
    (folder / "nine").rename(folder / "9")
    write_digits(folder, range(0, 150))
    (folder / "10").mkdir()
    for i, path in enumerate(sorted((folder / "7").iterdir())[:10]):
        shutil.copy(path, folder / "10" / f"copy-{i}.png")
    added = load_prepared(prepare_dataset(config.data, tmp_path / "data"))
    eleven = with_data_classes(config, added.manifest["class_names"])
    validate_for_model(added, 8, 1, eleven.model.num_classes)
    assert eleven.model.num_classes == 11
    decision, reason = retrain_decision((run, config, champion), eleven, added.fingerprint, "champion", False,
                                        class_names=added.manifest["class_names"])
    assert decision == "scratch" and "added '10'" in reason
    # the same retrain, tried already and lost: not trained again every night
    assert retrain_decision((run, config, champion), eleven, added.fingerprint, "champion", False, tried="run-9",
                            class_names=added.manifest["class_names"])[0] == "skipped"

    # a run from before the tag: its prepared data's manifest says; neither: a conditional model starts over
    del run.data.tags[DATASET_CLASS_NAMES_TAG]
    assert retrain_decision((run, config, champion), config, grown["fingerprint"], "champion", False,
                            class_names=grown["class_names"])[0] == "warm-start"
    shutil.rmtree(before.path)
    decision, reason = retrain_decision((run, config, champion), config, grown["fingerprint"], "champion", False,
                                        class_names=grown["class_names"])
    assert decision == "scratch" and reason.startswith("cannot tell whether the classes changed")
    # an unconditional model does not use labels: it warm-starts, and the reason says the classes changed
    plain = config.with_settings({"model.num_classes": None})
    decision, reason = retrain_decision((client.get_run(run_id), plain, champion), plain, removed.fingerprint,
                                        "champion", False, class_names=removed.manifest["class_names"])
    assert decision == "warm-start" and "which an unconditional model does not use" in reason


def test_noise_aware_promotion_moves_only_beyond_the_paired_spread():
    from tasks.registry import noise_aware_decision

    moved, reason, numbers = noise_aware_decision([20.0, 21.0, 19.5], [25.0, 26.5, 24.0])
    assert moved and "beyond the noise margin" in reason
    assert numbers["challenger_fid"] == pytest.approx(20.1666, abs=1e-3) and numbers["seeds"] == 3
    differences = [-5.0, -5.5, -4.5]
    assert numbers["margin"] == pytest.approx(2.919986 * statistics.stdev(differences) / 3 ** 0.5)   # t(0.95, 2)
    moved, reason, _ = noise_aware_decision([20.0, 26.0, 19.0], [21.0, 21.0, 21.0])   # lower mean, inside the noise
    assert not moved and "a tie within the noise margin" in reason and "champion kept" in reason
    assert not noise_aware_decision([30.0, 31.0, 32.0], [20.0, 21.0, 22.0])[0]
    assert not noise_aware_decision([20.0, 21.0], [20.5, 21.5], min_margin=1.0)[0]   # the floor of the margin


def test_two_equal_models_rarely_swap_under_the_noise_aware_rule_and_often_under_the_strict_one():
    """Equal quality: per-seed FIDs drawn around the same mean with a shared per-seed component (the
    same seeds draw similar images for both). The strict rule swaps half the time; the noise-aware
    rule 1 - confidence = 5% of the time (a one-sided paired t-test), the default confidence."""
    from tasks.registry import champion_decision, noise_aware_decision

    def strict_rule(a: float, b: float) -> bool:   # the logged-FID rule, one sample set each
        tags = {contract.FID_METRIC_TAG: "fid_classifier", contract.DATASET_FINGERPRINT_TAG: "d",
                contract.FID_NUM_SAMPLES_TAG: "350", contract.CONDITIONAL_TAG: "false"}
        return champion_decision({**tags, contract.VERSION_FID_TAG: repr(a)}, {**tags, contract.VERSION_FID_TAG: repr(b)})[0]

    rng = random.Random(0)
    trials, strict, aware = 2000, 0, 0
    for _ in range(trials):
        shared = [rng.gauss(0, 3) for _ in range(3)]
        a = [25 + s + rng.gauss(0, 1) for s in shared]
        b = [25 + s + rng.gauss(0, 1) for s in shared]
        strict += strict_rule(a[0], b[0])
        aware += noise_aware_decision(a, b)[0]
    assert 0.45 < strict / trials < 0.55
    assert 0.03 < aware / trials < 0.07


def write_digits(folder, indices):
    """scikit-learn's 8x8 digits as PNG files in one sub-folder per class (real images, labelled)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in indices:
        path = folder / str(digits.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)


def split_hashes(dataset_path):
    from ddpm.data import load_prepared

    dataset = load_prepared(dataset_path)
    hashes = [bytes(h) for h in dataset.content_hashes]
    return ({hashes[i] for i in dataset.train_indices.tolist()}, {hashes[i] for i in dataset.holdout_indices.tolist()})


@pytest.mark.slow
def test_the_nightly_loop_on_a_growing_folder(prefect_harness, mlflow_store, tmp_path):
    """Night 1 trains and promotes; night 2 (nothing changed) trains nothing and says so; night 3
    (the folder grew) warm-starts from the champion, re-scores it on the new reference and records
    the decision with both numbers. Old images never move from train to holdout. The champion
    server answers every request throughout, serves the champion the alias names, and refuses a
    version that fails its check (the previous champion keeps serving)."""
    import json
    import threading
    import urllib.request

    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain
    from flows.train_pipeline import train_pipeline
    from tasks.champion_server import ChampionServer
    from tasks.registry import promote_best
    from tasks.serving import log_ddpm_model
    from test_champion_server import nan_checkpoint
    from trained_runs import TINY_MODEL

    client = MlflowClient(mlflow_store)
    folder = tmp_path / "incoming"
    write_digits(folder, range(0, 1200))
    params = dict(data={"source": f"folder:{folder}"}, model=TINY_MODEL, diffusion={"num_timesteps": 100},
                  train={"steps": 30, "batch_size": 32, "warmup_steps": 5, "log_every": 10, "checkpoint_every": 30,
                         "progress_images": 0, "device": "cpu"},
                  sampling={"num_images": 100, "batch_size": 100, "num_steps": 8}, fid_extractor="classifier")

    # night 1: the first model, promoted (no champion yet)
    first = train_pipeline(**params, experiment="loop")
    assert promote_best("loop", "loop-model")["moved"]
    server = ChampionServer("loop-model", port=0, poll_seconds=0.5, check_seconds=120, log=lambda _: None).start()
    answers, stop = [], threading.Event()

    def keep_asking():
        body = json.dumps({"dataframe_records": [{"num_images": 1}], "params": {"steps": 2}}).encode()
        while not stop.is_set():
            request = urllib.request.Request(f"{server.url}/invocations", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append(response.status)
            except Exception as error:   # noqa: BLE001 (every failure counts)
                answers.append(repr(error))
            stop.wait(0.3)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    try:
        # night 2: nothing changed
        skipped = retrain(experiment="loop", promote_to="loop-model")
        assert skipped["decision"] == "skipped" and "nothing changed" in skipped["reason"]
        assert client.get_run(skipped["run_id"]).data.tags["retrain.decision"] == "skipped"
        assert len(client.search_runs([client.get_experiment_by_name("loop").experiment_id],
                                      "tags.`retrain.decision` = 'skipped'")) == 1

        # night 3: the folder grew by half
        write_digits(folder, range(1200, 1797))
        grown = retrain(experiment="loop", promote_to="loop-model")
        assert grown["decision"] == "warm-start" and "the data changed" in grown["reason"]
        run = client.get_run(grown["run_id"])
        assert run.data.tags["retrain.decision"] == "warm-start" and run.data.tags["retrain.champion_version"] == "1"
        assert run.data.params["train.init_from"].endswith(".pt") and run.data.tags["dataset.version"] == "2"
        assert run.data.tags["dataset.moved_to_holdout"] == "0" and run.data.tags["dataset.added"] == "597"
        old_train, old_holdout = split_hashes(first["dataset"])
        new_train, new_holdout = split_hashes(grown["dataset"])
        assert old_train <= new_train and old_holdout <= new_holdout and not old_train & new_holdout
        # the champion re-scored on the new reference: both numbers, on the version and the run
        promotion = grown["promotion"]
        numbers = promotion["head_to_head"]
        assert numbers["seeds"] == 3 and numbers["champion_version"] == "1"
        assert len(numbers["challenger_fids"]) == len(numbers["champion_fids"]) == 3
        version_tags = client.get_model_version("loop-model", promotion["version"]).tags
        assert float(version_tags["promotion.head_to_head.champion_fid"]) == pytest.approx(numbers["champion_fid"],
                                                                                          rel=1e-5)
        assert float(run.data.tags["promotion.head_to_head.challenger_fid"]) == pytest.approx(
            numbers["challenger_fid"], rel=1e-5)
        assert promotion["moved"] == (numbers["difference"] < -numbers["margin"])
        champion = client.get_model_version_by_alias("loop-model", "champion").version
        deadline = time.monotonic() + 120
        while server.status()["version"] != str(champion):
            assert time.monotonic() < deadline, server.status()
            time.sleep(0.5)

        # a version that fails its check never serves: the alias goes back, the champion keeps serving
        broken = log_ddpm_model(grown["run_id"], nan_checkpoint(Path(grown["checkpoint"]), tmp_path / "nan"),
                                registered_model_name="loop-model").registered_model_version
        client.set_registered_model_alias("loop-model", "champion", str(broken))
        deadline = time.monotonic() + 120
        while client.get_model_version("loop-model", str(broken)).tags.get("serving.check") != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert str(client.get_model_version_by_alias("loop-model", "champion").version) == str(champion)
        assert server.status()["version"] == str(champion)

        # the folder is gone: one line naming it, before any run is made
        import shutil

        runs = len(client.search_runs([client.get_experiment_by_name("loop").experiment_id]))
        shutil.rmtree(folder)
        with pytest.raises(Exception, match=f"folder {folder} does not exist"):
            retrain(experiment="loop", promote_to="loop-model")
        assert len(client.search_runs([client.get_experiment_by_name("loop").experiment_id])) == runs
    finally:
        stop.set()
        asker.join(timeout=70)
        server.close()
    assert answers and all(answer == 200 for answer in answers), [a for a in answers if a != 200][:3]

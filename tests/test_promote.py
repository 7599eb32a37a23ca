"""Promotion to the MLflow registry and the pyfunc it registers, on a real sqlite MLflow store.

The runs are made by hand (tests/trained_runs.py) with chosen FIDs, each holding a copy of one
tiny trained checkpoint: the promotion rule is about the numbers and tags, not about training.
"""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from trained_runs import fake_trained_run, tiny_checkpoint

pytestmark = pytest.mark.slow   # registered models, loaded and sampled

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # to see that nothing lands in the working directory
    return MlflowClient(uri)


def versions(client, name="ddpm"):
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_champion_moves_only_on_a_strictly_better_fid(store, checkpoint):
    from tasks.registry import promote_best

    worse = fake_trained_run(store, "ddpm", checkpoint, 5.0)
    best = fake_trained_run(store, "ddpm", checkpoint, 3.0, schedule="cosine")
    fake_trained_run(store, "ddpm", checkpoint, 4.0)
    fake_trained_run(store, "ddpm", checkpoint, 0.5, status="FAILED")          # not finished: never a candidate
    fake_trained_run(store, "ddpm", checkpoint, 1.0, metric="fid_inception")   # another extractor
    fake_trained_run(store, "ddpm", checkpoint, 1.0, fingerprint="data-b")     # other data
    fake_trained_run(store, "ddpm", checkpoint, 1.0, num_samples=1000)         # another sample count
    fake_trained_run(store, "ddpm", checkpoint, 4.5)                           # newest: data-a, fid_classifier

    first = promote_best("ddpm", "ddpm")
    assert first["run_id"] == best and first["moved"] and first["reason"] == "no champion yet"
    champion = store.get_model_version_by_alias("ddpm", "champion")
    assert str(champion.version) == first["version"] == "1" and champion.run_id == best
    assert {k: champion.tags[k] for k in ("fid", "fid.metric", "schedule", "dataset.fingerprint", "source_run_id")} == {
        "fid": "3.0", "fid.metric": "fid_classifier", "schedule": "cosine", "dataset.fingerprint": "data-a",
        "source_run_id": best}
    assert champion.tags["promotion.decision"] == "champion"
    # the model's files live with its run's experiment (in DDPM_HOME), not in ./mlruns
    logged = store.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.experiment_id == store.get_run(best).info.experiment_id and logged.status == LoggedModelStatus.READY
    assert logged.artifact_location.startswith((Path(os.environ["DDPM_HOME"]) / "mlartifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists()

    again = promote_best("ddpm", "ddpm")  # idempotent: the same run is not registered twice
    assert (again["version"], again["moved"], again["reason"]) == ("1", False, "already the champion")
    assert versions(store) == [1]
    assert store.get_model_version("ddpm", "1").tags["promotion.decision"] == "champion"   # not rewritten to kept

    tie = fake_trained_run(store, "ddpm", checkpoint, 3.0)  # newest of the two 3.0s comes first
    result = promote_best("ddpm", "ddpm")
    assert result["run_id"] == tie and result["version"] == "2" and not result["moved"]
    assert "ties" in result["reason"] and "champion kept" in result["reason"]
    assert store.get_model_version("ddpm", "2").tags["promotion.reason"] == result["reason"]
    assert str(store.get_model_version_by_alias("ddpm", "champion").version) == "1"

    better = fake_trained_run(store, "ddpm", checkpoint, 2.5)
    result = promote_best("ddpm", "ddpm")
    assert (result["run_id"], result["version"], result["moved"]) == (better, "3", True)
    assert "beats" in result["reason"]
    assert str(store.get_model_version_by_alias("ddpm", "champion").version) == "3"
    assert versions(store) == [1, 2, 3]  # earlier versions stay: the alias can be moved back by hand
    assert worse not in {store.get_model_version("ddpm", str(v)).run_id for v in versions(store)}


def test_two_promotions_at_once_register_the_best_run_once(store, checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    from tasks.registry import promote_best

    best = fake_trained_run(store, "ddpm", checkpoint, 3.0)
    fake_trained_run(store, "ddpm", checkpoint, 4.0)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: promote_best("ddpm", "ddpm", log=lambda _: None), range(2)))
    assert {r["run_id"] for r in results} == {best} and versions(store) == [1]
    assert sorted(r["moved"] for r in results) == [False, True]


def test_a_champion_measured_on_other_data_is_not_compared(store, checkpoint):
    from tasks.registry import promote_best

    fake_trained_run(store, "ddpm", checkpoint, 9.0, fingerprint="data-a")
    assert promote_best("ddpm", "ddpm")["moved"]
    fake_trained_run(store, "ddpm", checkpoint, 1.0, fingerprint="data-b")
    result = promote_best("ddpm", "ddpm")  # the newest run's data: data-b
    assert result["fingerprint"] == "data-b" and not result["moved"]
    assert "another dataset" in result["reason"] and "not comparable" in result["reason"]
    assert str(store.get_model_version_by_alias("ddpm", "champion").version) == "1"
    with pytest.raises(LookupError, match="no finished run .* fid_inception"):
        promote_best("ddpm", "ddpm", metric="fid_inception")
    with pytest.raises(LookupError, match="no finished run with an FID"):
        promote_best("missing-experiment", "ddpm")


def test_a_champion_measured_at_another_sample_count_is_not_compared(store, checkpoint):
    from tasks.registry import promote_best

    fake_trained_run(store, "ddpm", checkpoint, 9.0, num_samples=500)
    assert promote_best("ddpm", "ddpm")["moved"]
    fake_trained_run(store, "ddpm", checkpoint, 1.0, num_samples=1000)   # lower, but at another count
    result = promote_best("ddpm", "ddpm")
    assert result["num_samples"] == "1000" and not result["moved"]
    assert "another sample count" in result["reason"] and "not comparable" in result["reason"]
    assert str(store.get_model_version_by_alias("ddpm", "champion").version) == "1"


def test_registered_model_draws_bounded_images(store, checkpoint):
    import mlflow.pyfunc

    from tasks.registry import promote_best

    fake_trained_run(store, "ddpm", checkpoint, 3.0)
    promote_best("ddpm", "ddpm", max_images=4)
    model = mlflow.pyfunc.load_model("models:/ddpm@champion")
    assert set(model.metadata.get_params_schema().to_dict()[i]["name"] for i in range(5)) == {
        "seed", "sampler", "steps", "eta", "format"}

    params = {"seed": 3, "sampler": "ddim", "steps": 5}
    images = model.predict({"num_images": 2}, params=params)
    assert images.shape == (2, 1, 16, 16) and images.dtype == np.uint8
    assert np.array_equal(images, model.predict({"num_images": 2}, params=params))  # seeded
    assert not np.array_equal(images, model.predict({"num_images": 2}, params={**params, "seed": 4}))
    pngs = model.predict({"num_images": 2}, params={**params, "format": "png_base64"})
    decoded = np.array(Image.open(io.BytesIO(base64.b64decode(pngs[1]))))
    assert np.array_equal(decoded, images[1, 0])  # the PNG is exactly the uint8 image
    ddpm = model.predict({"num_images": 1}, params={"sampler": "ddpm", "steps": 3})
    assert ddpm.shape == (1, 1, 16, 16)

    for bad_input, bad_params, message in [
        ({"num_images": 5}, params, "'num_images' must be between 1 and 4"),
        ({"num_images": 0}, params, "'num_images' must be between 1 and 4"),
        ({"num_images": 1}, {"steps": 101}, "'steps' must be between 1 and 100"),  # T = 100
        ({"num_images": 1}, {"sampler": "euler"}, "'sampler' must be one of"),
        ({"num_images": 1}, {"eta": 2.0}, "'eta' must be a number between 0 and 1"),
        ({"num_images": 1}, {"format": "jpeg"}, "'format' must be one of"),
        ({"num_images": 1}, {"steps": "many"}, "steps"),  # MLflow's own param type check
    ]:
        with pytest.raises(MlflowException, match=message) as error:
            model.predict(bad_input, params=bad_params)
        assert error.value.get_http_status_code() == 400


def test_champion_loads_from_another_directory_in_a_fresh_process(store, checkpoint, tmp_path):
    from tasks.registry import promote_best

    fake_trained_run(store, "ddpm", checkpoint, 3.0)
    promote_best("ddpm", "ddpm")
    # a fresh interpreter in an empty directory, the project importable as if pip-installed
    # (PYTHONPATH stands in for site-packages) but not via the working directory
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    script = ("import json, mlflow.pyfunc\n"
              "m = mlflow.pyfunc.load_model('models:/ddpm@champion')\n"
              "x = m.predict({'num_images': 2}, params={'steps': 4, 'seed': 1})\n"
              "print(json.dumps([list(x.shape), str(x.dtype)]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(tmp_path / "other-home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[2, 1, 16, 16], "uint8"]


def test_promote_flow(prefect_harness, store, checkpoint):
    from flows.promote import PromoteConfig, promote

    run_id = fake_trained_run(store, "other", checkpoint, 2.0)
    state = promote(PromoteConfig(experiments=["other"], model_name="tiny"), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["run_id"] == run_id and result["moved"] and result["model_name"] == "tiny"
    assert store.get_model_version_by_alias("tiny", "champion").run_id == run_id

"""Retention (tasks/retention.py, `ddpm gc`): a real MLflow store, real prepared versions and files in
a real DDPM_HOME; what goes is exactly what the policy names, and nothing a kept run, the champion,
a resumable run or the next preparation needs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from ddpm.data import DataConfig, load_prepared, prepare_dataset


def write_pngs(root: Path, indices) -> None:
    from sklearn.datasets import load_digits

    images = (load_digits().images * 15).astype("uint8")
    root.mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(root / f"d{i:04d}.png")


def write_checkpoint(folder: Path, step: int, size: int = 50_000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def home(mlflow_store, tmp_path):
    """DDPM_HOME with three versions of a folder lineage, runs on them, a champion, caches."""
    from mlflow.tracking import MlflowClient

    from tasks import contract

    home = Path(os.environ["DDPM_HOME"])
    source = tmp_path / "imgs"
    config = DataConfig(source=f"folder:{source}", image_size=8, resize="none")
    versions = []
    for count in (60, 70, 80):
        write_pngs(source, range(count))
        versions.append(load_prepared(prepare_dataset(config, home / "data")))
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("loop", artifact_location=(home / "mlartifacts").as_uri())
    uses = [0, 0, 1, 2, 2]   # runs r0..r4 (oldest first) on versions v0, v0, v1, v2, v2
    runs = []
    for i, version in enumerate(uses):
        data = versions[version]
        run = client.create_run(experiment, start_time=1_000 + i, tags={
            contract.DATASET_FINGERPRINT_TAG: data.fingerprint, contract.DATASET_PATH_TAG: str(data.path)})
        run_id = run.info.run_id
        write_checkpoint(home / "runs" / run_id / "checkpoints", 10)
        (home / "runs" / run_id / "samples.npz").write_bytes(b"s" * 1000)
        client.set_terminated(run_id)
        runs.append(run_id)
    failed = client.create_run(experiment, start_time=500, tags={contract.DATASET_FINGERPRINT_TAG: versions[1].fingerprint})
    write_checkpoint(home / "runs" / failed.info.run_id / "checkpoints", 20)
    client.set_terminated(failed.info.run_id, status="FAILED")
    skipped = client.create_run(experiment, start_time=2_000)   # a skipped night's record: no data, no files
    client.set_terminated(skipped.info.run_id)
    client.create_registered_model("ddpm")
    for run_id in (runs[0], runs[2]):
        client.create_model_version("ddpm", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("ddpm", "champion", "1")     # r0, on v0
    for version in ("1", "2"):
        write_checkpoint(home / "registry" / "ddpm" / f"{version}-abcdef", 1)
    metrics = home / "cache" / "metrics"
    metrics.mkdir(parents=True)
    for data in versions:
        (metrics / f"classifier-{data.fingerprint[:16]}.pt").write_bytes(b"c" * 5000)
        (metrics / f"fid-floor-inception-0123456789abcdef0-{data.fingerprint[:16]}-n64.json").write_text("{}")
    (metrics / "something-else.json").write_text("{}")
    for fingerprint in (versions[0].fingerprint, "f" * 64):
        write_checkpoint(home / "cache" / "datasets" / fingerprint[:32], 1)
    stranger = write_checkpoint(home / "runs" / ("0" * 32) / "checkpoints", 5)   # a run this store does not know
    return {"home": home, "versions": versions, "runs": runs, "failed": failed.info.run_id, "stranger": stranger,
            "metrics": metrics, "config": config}


def expected_removals(h) -> set[str]:
    """Kept: r0 (the champion), r3 and r4 (the newest 2 training runs), the FAILED run (resumable),
    v0 (the champion's data), v1 (the resumable run's data), v2 (the newest version)."""
    home, runs = h["home"], h["runs"]
    return {
        str(home / "runs" / runs[1] / "checkpoints"),
        str(home / "runs" / runs[2] / "checkpoints"),   # registered (version 2), but no alias names it
        str(home / "registry" / "ddpm" / "2-abcdef"),
        str(home / "cache" / "datasets" / ("f" * 32)),
    }


def test_gc_removes_exactly_what_the_policy_names(home):
    from tasks import retention

    h = home
    before = {p for p in h["home"].rglob("*")}
    dry = retention.collect(keep=2, dry_run=True)
    assert {p for p in h["home"].rglob("*")} == before          # a dry run removes nothing
    # v1 stays: the FAILED run that can resume from its checkpoints trained on it
    assert {path for path, _, _ in dry["removed"]} == expected_removals(h)
    assert dry["would_free"] == sum(size for _, size, _ in dry["removed"]) > 100_000
    kept = dry["kept_runs"]
    assert set(kept) == {h["runs"][0], h["runs"][3], h["runs"][4], h["failed"]}
    assert "alias" in kept[h["runs"][0]] and "resumable" in kept[h["failed"]]

    done = retention.collect(keep=2)
    assert done["freed"] == dry["would_free"]
    for path in expected_removals(h):
        assert not Path(path).exists(), path
    for run_id in (h["runs"][0], h["runs"][3], h["runs"][4], h["failed"]):
        assert (h["home"] / "runs" / run_id / "checkpoints").is_dir()
    assert (h["home"] / "runs" / h["runs"][1] / "samples.npz").is_file()   # samples stay
    assert h["stranger"].is_file()                                          # not this store's run
    for data in h["versions"]:
        assert load_prepared(data.path).fingerprint == data.fingerprint
    assert (h["home"] / "registry" / "ddpm" / "1-abcdef").is_dir()
    assert (h["metrics"] / "something-else.json").is_file()
    assert retention.collect(keep=2, dry_run=True)["removed"] == []         # nothing left to free


def test_a_prepared_version_no_kept_run_uses_goes_and_the_lineage_still_grows(home):
    """With the resumable run gone, v1 is used by no kept run and is not the newest: removed. The next
    night prepares incrementally from the newest version, which retention always keeps."""
    from mlflow.tracking import MlflowClient

    from tasks import retention

    h = home
    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).delete_run(h["failed"])
    done = retention.collect(keep=2)
    removed = {path for path, _, _ in done["removed"]}
    assert str(h["versions"][1].path) in removed and not h["versions"][1].path.exists()
    assert str(h["metrics"] / f"classifier-{h['versions'][1].fingerprint[:16]}.pt") in removed
    assert h["versions"][0].path.is_dir() and h["versions"][2].path.is_dir()
    source = Path(h["config"].source.partition(":")[2])
    write_pngs(source, range(80, 90))
    grown = load_prepared(prepare_dataset(h["config"], h["home"] / "data"))
    assert grown.manifest["count"] == 90


def test_ddpm_gc_dry_run_says_what_it_would_free(home, capsys):
    from flows.cli import main

    assert main(["gc", "--dry-run", "--keep-runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "ddpm gc: would free" in out and "registry/ddpm/2-abcdef" in out
    assert (home["home"] / "registry" / "ddpm" / "2-abcdef").is_dir()
    assert main(["gc", "--keep-runs", "-1"]) == 1
    assert capsys.readouterr().err.strip().endswith("--keep-runs must be >= 0, got -1")


def test_retention_settings_are_read_from_the_environment(monkeypatch):
    from tasks import retention

    monkeypatch.setenv("DDPM_KEEP_RUNS", "7")
    assert retention.keep_runs() == 7 and retention.enabled()
    monkeypatch.setenv("DDPM_RETENTION", "off")
    assert not retention.enabled()
    monkeypatch.setenv("DDPM_KEEP_RUNS", "some")
    with pytest.raises(ValueError, match=r"^DDPM_KEEP_RUNS='some' must be a whole number >= 0$"):
        retention.keep_runs()

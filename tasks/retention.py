"""Retention: what DDPM_HOME keeps night after night, and what it frees (`ddpm gc`, every retrain).

On by default; DDPM_RETENTION=off turns it off for the nightly retrain (`ddpm gc` still runs when
asked), DDPM_KEEP_RUNS=N (default KEEP_RUNS) sets how many of each experiment's newest runs keep
their checkpoints. `ddpm gc --dry-run` lists what would go and what it would free.

Kept, always:
  - the run of every registered model version that an alias names (`champion`, ...): its
    checkpoints, its prepared data, its fetched copies, the registry bundle of that version
  - a resumable run: RUNNING, FAILED or KILLED with checkpoints on this host (not deleted)
  - the newest KEEP_RUNS training runs of each experiment (by start time; a skipped night's record
    is not one), with their data
  - the newest version of each data lineage (the next preparation reads only what changed from it)
  - anything the tracking store does not know (a run folder of another store, a file of another
    kind): it is not this policy's to judge
Removed (only under DDPM_HOME; never the MLflow store, mlflow.db or mlartifacts):
  - prepared versions ($DDPM_HOME/data/<name>) that no kept run uses and that are not their
    lineage's newest
  - checkpoints of the runs not kept ($DDPM_HOME/runs/<id>/checkpoints, or the run's checkpoint_dir
    when it lies under DDPM_HOME), fetched ones included; the run's samples stay
  - downloaded copies of registered versions no alias names ($DDPM_HOME/registry/<name>/<version>-*)
  - fetched prepared data of runs not kept ($DDPM_HOME/cache/datasets/<fingerprint>)
  - reference caches (classifier, reference statistics, floors in $DDPM_HOME/cache/metrics) of data
    that no kept run or kept version has
A run removed this way can still be evaluated or warm-started from elsewhere: its data is prepared
again from its source (same fingerprint) and its registered model lives in the tracking store.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks import contract, settings, tracking

RETENTION_ENV = "DDPM_RETENTION"     # "off": no retention after a nightly retrain
KEEP_RUNS_ENV = "DDPM_KEEP_RUNS"     # the newest runs of each experiment that keep their checkpoints
KEEP_RUNS = 3
RESUMABLE = ("RUNNING", "FAILED", "KILLED")
# named by a fingerprint's first 16 hex digits: today's caches (ddpm.metrics.measures, scoring) and
# the FID-only ones written before the measures shared one feature pass (no longer read)
METRICS_CACHE_PREFIXES = ("classifier-", "features-ref-", "kid-ref-", "floors-", "fid-ref-", "fid-floor-")
_FP16 = re.compile(r"(?<![0-9a-f])[0-9a-f]{16}(?![0-9a-f])")


def enabled() -> bool:
    return os.environ.get(RETENTION_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def keep_runs() -> int:
    text = os.environ.get(KEEP_RUNS_ENV, "").strip()
    if not text:
        return KEEP_RUNS
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{KEEP_RUNS_ENV}={text!r} must be a whole number >= 0")
    return value


def usage(path: Path) -> int:
    """Bytes a folder takes on disk (allocated blocks; links not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


@dataclass
class Plan:
    """What retention would remove (path, bytes, why) and what it keeps (why), for one DDPM_HOME."""
    home: Path
    remove: list[tuple[Path, int, str]] = field(default_factory=list)
    kept_runs: dict[str, str] = field(default_factory=dict)   # run id -> why

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.remove)

    def add(self, path: Path, why: str) -> None:
        if path.exists() and all(path != p for p, _, _ in self.remove):
            self.remove.append((path, usage(path) if path.is_dir() else _size(path), why))


def _size(path: Path) -> int:
    try:
        return path.lstat().st_blocks * 512
    except OSError:
        return 0


def _under(path: Path, home: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(home))
        return True
    except ValueError:
        return False


def _all_runs(client) -> list:
    from mlflow.entities import ViewType

    runs = []
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000,
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def _aliased_versions(client) -> dict[tuple[str, str], str]:
    """{(model name, version): the run id} of every version an alias names."""
    found = {}
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for model in page:
            for version in set((model.aliases or {}).values()):
                found[(model.name, str(version))] = client.get_model_version(model.name, str(version)).run_id
        token = page.token
        if not token:
            return found


def plan(home: Path | None = None, keep: int | None = None) -> Plan:
    """What retention removes under `home` (default DDPM_HOME) with the newest `keep` runs of each
    experiment kept (default DDPM_KEEP_RUNS): nothing is removed here."""
    from ddpm.checkpoint import list_checkpoints
    from ddpm.data import DataError, read_manifest
    from ddpm.data.versions import VERSIONS_DIR, lineage_history
    from tasks import run_files

    home = Path(home or settings.ddpm_home()).resolve()
    keep = keep_runs() if keep is None else keep
    client = tracking.client()
    result = Plan(home)
    runs = _all_runs(client)
    aliased = _aliased_versions(client)
    champions = set(aliased.values())
    newest: dict[str, int] = {}   # training runs (those with data) seen so far, by experiment
    datasets_experiment = _datasets_experiment(client)
    for run in runs:   # newest first within each experiment
        run_id, status = run.info.run_id, run.info.status
        if run_id in champions:
            result.kept_runs[run_id] = "an alias names its registered version"
        elif status in RESUMABLE and run.info.lifecycle_stage == "active" and \
                any(list_checkpoints(f) for f in run_files.checkpoint_folders(run)):
            result.kept_runs[run_id] = f"resumable ({status} with checkpoints)"
        training = (run.info.lifecycle_stage == "active" and run.info.experiment_id != datasets_experiment
                    and contract.DATASET_FINGERPRINT_TAG in run.data.tags)   # not a skipped night's record
        if training and run_id not in result.kept_runs and newest.get(run.info.experiment_id, 0) < keep:
            result.kept_runs[run_id] = f"among the newest {keep} training runs of its experiment"
        if training:
            newest[run.info.experiment_id] = newest.get(run.info.experiment_id, 0) + 1
    kept = [run for run in runs if run.info.run_id in result.kept_runs]
    kept_fingerprints = {run.data.tags.get(contract.DATASET_FINGERPRINT_TAG) for run in kept} - {None}
    kept_paths = {os.path.realpath(p) for run in kept if (p := run.data.tags.get(contract.DATASET_PATH_TAG))}

    # prepared versions: the newest of each lineage, and those of kept runs
    data_dir = home / "data"
    for history in sorted((data_dir / VERSIONS_DIR).glob("*.json")) if (data_dir / VERSIONS_DIR).is_dir() else []:
        if history.name.endswith(".aliases.json"):
            continue
        try:
            import json
            config = json.loads(history.read_text())["config"]
            entries = lineage_history(config, data_dir)
        except (OSError, ValueError, KeyError, DataError):
            continue
        if entries:
            kept_paths.add(os.path.realpath(data_dir / entries[-1]["path"]))
            kept_fingerprints.add(entries[-1]["fingerprint"])
    if data_dir.is_dir():
        for folder in sorted(data_dir.iterdir()):
            if not folder.is_dir() or folder.name.startswith(".") or folder.name in ("downloads", VERSIONS_DIR):
                continue
            try:
                fingerprint = read_manifest(folder)["fingerprint"]
            except (DataError, KeyError):
                continue   # not a prepared folder: not ours to judge
            if os.path.realpath(folder) in kept_paths or fingerprint in kept_fingerprints:
                kept_fingerprints.add(fingerprint)
                continue
            result.add(folder, "a prepared version no kept run uses, not its lineage's newest")

    # checkpoints of the runs not kept, fetched or trained here (only under DDPM_HOME)
    for run in runs:
        if run.info.run_id in result.kept_runs:
            continue
        for folder in run_files.checkpoint_folders(run):
            if folder.is_dir() and _under(folder, home) and list_checkpoints(folder):
                result.add(folder, f"checkpoints of run {run.info.run_id} ({run.info.status}), not kept")

    # downloaded copies of registered versions no alias names
    registry = home / "registry"
    for model in sorted(registry.iterdir()) if registry.is_dir() else []:
        for copy in sorted(model.iterdir()) if model.is_dir() else []:
            version = copy.name.partition("-")[0]
            if version.isdigit() and (model.name, version) not in aliased:
                result.add(copy, f"a downloaded copy of {model.name} version {version}, which no alias names")

    # fetched prepared data of runs not kept
    fetched = home / "cache" / "datasets"
    for folder in sorted(fetched.iterdir()) if fetched.is_dir() else []:
        if folder.is_dir() and not any(fp.startswith(folder.name) for fp in kept_fingerprints):
            result.add(folder, "fetched prepared data of no kept run")

    # reference caches of data no kept run or version has
    kept16 = {fp[:16] for fp in kept_fingerprints}
    metrics = home / "cache" / "metrics"
    for file in sorted(metrics.iterdir()) if metrics.is_dir() else []:
        if file.is_file() and file.name.startswith(METRICS_CACHE_PREFIXES):
            tokens = set(_FP16.findall(file.name))
            if tokens and not tokens & kept16:
                result.add(file, "a reference cache of data no kept run has")
    return result


def _datasets_experiment(client) -> str | None:
    experiment = client.get_experiment_by_name(contract.DATASETS_EXPERIMENT)
    return experiment.experiment_id if experiment else None


def apply(plan_: Plan) -> int:
    """Remove what the plan lists; the bytes freed. A folder goes by rename-then-delete, so a reader
    never sees half of it."""
    freed = 0
    for path, size, _ in plan_.remove:
        if not path.exists():
            continue
        if path.is_dir():
            trash = path.with_name(f".{path.name}.gc-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        freed += size
    return freed


def collect(home: Path | None = None, keep: int | None = None, dry_run: bool = False) -> dict:
    """Plan, and unless dry_run apply: {"would_free" or "freed": bytes, "removed": [(path, bytes, why)],
    "kept_runs": {run: why}, "home_bytes": DDPM_HOME's size afterwards}."""
    result = plan(home, keep)
    freed = 0 if dry_run else apply(result)
    return {("would_free" if dry_run else "freed"): result.bytes if dry_run else freed,
            "removed": [(str(p), size, why) for p, size, why in result.remove],
            "kept_runs": result.kept_runs, "home_bytes": usage(result.home)}


def after_night(home: Path, before: int, run_id: str | None, log=print) -> dict:
    """What a nightly retrain used and (retention on) freed, logged in one line and, with a run, as
    its metrics disk.used_mib, disk.freed_mib, disk.home_mib. Retention failing never fails the night."""
    used = usage(home) - before
    freed, note = 0, ""
    if enabled():
        try:
            freed = collect(home)["freed"]
        except Exception as error:   # noqa: BLE001: information, not a reason to fail the training
            note = f" (retention failed: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
    else:
        note = f" (retention off: {RETENTION_ENV})"
    after = usage(home)
    log(f"disk: the night used {used / 2**20:.1f} MiB, retention freed {freed / 2**20:.1f} MiB, "
        f"DDPM_HOME holds {after / 2**20:.1f} MiB{note}")
    if run_id:
        try:
            disk = ((contract.DISK_USED_METRIC, used), (contract.DISK_FREED_METRIC, freed),
                    (contract.DISK_HOME_METRIC, after))
            now = int(time.time() * 1000)
            tracking.client().log_batch(run_id, metrics=[tracking.Metric(name, value / 2**20, now, 0)
                                                         for name, value in disk])
        except Exception:   # noqa: BLE001
            pass
    return {"used_bytes": used, "freed_bytes": freed, "home_bytes": after}


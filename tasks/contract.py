"""The MLflow run contract: every name that one step of the pipeline writes and another reads.

Training writes a run; evaluate, retrain, resume, promotion and the served model read it back.
Each tag, param, metric, artifact and registry name they share is defined here once, so a
writer and its readers cannot drift apart. Names stay as runs have always been written (older
runs and registered versions keep being read).

    run tags         who ran it, where its checkpoints are, what data and kind of model, how its FID was measured
    metrics, params  the loss, the parameter count; the FIDs and their floors are named by the scorer
                     (ddpm.metrics.scoring: fid_<extractor>, fid_<extractor>_floor)
    artifacts        the configuration it ran with (config.json), plots, samples, evaluation tables
    registry         the registered model, its `champion` alias, the tags of each version
"""

from __future__ import annotations

DEFAULT_EXPERIMENT = "ddpm"   # every flow's and command's default MLflow experiment
DEFAULT_MODEL_NAME = "ddpm"   # the registered model promotion fills
CHAMPION_ALIAS = "champion"   # the registered version that is served

# MLflow 3's UI opens an experiment without this tag in its GenAI view ("Evaluations", traces);
# training runs belong in the model-training view (runs, metrics, charts).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI opens every experiment in its GenAI view (traces, evaluation runs, an assistant)
# unless the link asks for the training view, or the user picked it once (the browser keeps it);
# the experiment kind tag alone no longer decides (checked in headless Chromium)
UI_TRAINING_VIEW = "workflowType=machine_learning"

# --- a pipeline run's tags ---------------------------------------------------------------------
FLOW_RUN_TAG = "prefect.flow_run_id"        # the Prefect flow run that trained it (a trigger finds the run by it)
FLOW_NAME_TAG = "prefect.flow_name"
PARENT_RUN_TAG = "mlflow.parentRunId"       # nests compare_schedules' children under their parent in the UI
HOST_TAG, PID_TAG = "ddpm.host", "ddpm.pid"  # the process working on a RUNNING run (vanished runs are failed)
ERROR_TAG = "error"                         # why a run FAILED
PREVIOUS_ERROR_TAG = "error.previous"       # why an attempt failed, on a run that a resume then finished
RESUMED_TAG = "resumed"                     # how many times it was resumed
RESUME_FORCED_TAG = "resume.forced"         # a resume that declared the RUNNING owner dead (--force), and whom
CHECKPOINT_DIR_TAG = "checkpoint_dir"       # the folder it trained in, on the host it trained on
# which checkpoints reached its artifact store (tasks.run_files: any host fetches them from there)
CHECKPOINTS_STORED_TAG = "checkpoints.stored"            # the steps stored, "4000,5000,6000"
CHECKPOINTS_STORE_ERROR_TAG = "checkpoints.store_error"  # those that never did, and why
SCHEDULE_TAG = "schedule"
CONDITIONAL_TAG = "model.conditional"       # "true" / "false": the two kinds never compete in promotion
RETRAIN_BASED_ON_TAG = "retrain.based_on"   # the run whose configuration a retrain used ("defaults": none)
RETRAIN_DECISION_TAG = "retrain.decision"   # skipped, warm-start or scratch (flows.retrain) ...
RETRAIN_REASON_TAG = "retrain.reason"       # ... and why
RETRAIN_CHAMPION_TAG = "retrain.champion_version"   # a warm start's starting point
GUIDANCE_BEST_SCALE_TAG = "guidance.best_scale"
EVALUATE_FLOW_RUN_TAG = "evaluate.flow_run_id"
FID_BEST_STEP_TAG = "fid.best_step"         # the checkpoint evaluate found best
# evaluate --posthoc-ema (tasks.posthoc): the width and step of the EMA it chose, and its checkpoint
# (a reconstruction; promotion registers it). "fixed" when the run's own EMA scored best.
POSTHOC_CHOSEN_TAG = "posthoc_ema.chosen"          # "reconstruction" or "fixed"
POSTHOC_SIGMA_REL_TAG = "posthoc_ema.sigma_rel"    # also on the logged model and the registered version
POSTHOC_STEP_TAG = "posthoc_ema.step"
POSTHOC_CHECKPOINT_TAG = "posthoc_ema.checkpoint"
POSTHOC_METRIC_PREFIX = "posthoc_ema."             # posthoc_ema.fid_<x>_best, posthoc_ema.fixed_fid_<x>

# the dataset it trained on (tasks.data.log_dataset_input); the fingerprint names the exact images
DATASET_FINGERPRINT_TAG = "dataset.fingerprint"
DATASET_NAME_TAG = "dataset.name"
# prepared data in the store, by fingerprint, for hosts that cannot reach the source (tasks.run_files)
DATASETS_EXPERIMENT = "ddpm-datasets"       # one run per fingerprint, tagged dataset.fingerprint
DATASET_ARTIFACT_DIR = "prepared"           # its manifest.json and data.npz
DATASET_PATH_TAG = "dataset.path"
DATASET_TRAIN_COUNT_TAG = "dataset.train_count"
DATASET_HOLDOUT_COUNT_TAG = "dataset.holdout_count"
# its version in its lineage (ddpm.data.versions): number, the version before it, what changed since
DATASET_VERSION_TAG = "dataset.version"                            # 1-based position in the lineage
DATASET_PREVIOUS_FINGERPRINT_TAG = "dataset.previous_fingerprint"  # "none" for a lineage's first version
DATASET_ADDED_TAG = "dataset.added"                                # images, by content hash ("unknown" when
DATASET_REMOVED_TAG = "dataset.removed"                            # the previous folder was gone)
DATASET_MOVED_TO_HOLDOUT_TAG = "dataset.moved_to_holdout"          # earlier train images now in the FID reference
DATASET_CLASS_NAMES_TAG = "dataset.class_names"      # the class names in label order, as JSON (tasks.data)
DATASET_SKIPPED_FILES_TAG = "dataset.skipped_files"  # source files preparation skipped (the manifest says why)

# how its primary metric was measured: the metric (measure and features: fid_inception, kid_inception),
# the sample count and the sampler (the names say "fid": runs have always been written so)
FID_METRIC_TAG = "fid.metric"
FID_NUM_SAMPLES_TAG = "fid.num_samples"
FID_SAMPLER_TAG = "fid.sampler"             # SamplerConfig.describe(): sampler, steps, eta, classes, guidance

# Two scores are comparable only when these agree (tag, what it means): Protocol below is them as
# one value; promotion and retrain rank runs, and the champion keeps its alias, by it. A run from
# before CONDITIONAL_TAG existed is unconditional.
COMPARABILITY_TAGS = ((FID_METRIC_TAG, "FID extractor"), (DATASET_FINGERPRINT_TAG, "dataset"),
                      (FID_NUM_SAMPLES_TAG, "sample count"), (CONDITIONAL_TAG, "kind of model"),
                      (FID_SAMPLER_TAG, "sampler"))
TAG_DEFAULTS = {CONDITIONAL_TAG: "false"}
# the part of the protocol an evaluation writes (the data and the kind of model are training's tags)
MEASUREMENT_TAGS = (FID_METRIC_TAG, FID_NUM_SAMPLES_TAG, FID_SAMPLER_TAG)

# --- params and metrics -------------------------------------------------------------------------
PARAMETERS_PARAM = "model.parameters"       # besides the flattened configuration (tracking.flatten_params)
# MLflow logs a logged model's model_config as params too: the served model's request bounds
# (tasks.served_model reads them from its config; a second model of one run keeps the first values)
MAX_IMAGES_PARAM, MAX_STEPS_PARAM, MAX_SECONDS_PARAM = "max_images", "max_steps", "max_seconds"
LOSS_METRIC = "loss"                        # per log window; a resume skips the steps already logged
PUBLISHED_MIB_METRIC = "checkpoints.published_mib"   # what this attempt uploaded to the artifact store
# a nightly retrain's disk (tasks.retention): what the night used, what retention freed, what DDPM_HOME holds
DISK_USED_METRIC, DISK_FREED_METRIC, DISK_HOME_METRIC = "disk.used_mib", "disk.freed_mib", "disk.home_mib"
TRAIN_METRIC_PREFIX = "train."              # the training summary (images/s, MFU, ...) at the last step
BEST_SUFFIX = "_best"                       # evaluate: fid_<extractor>_best at the best checkpoint's step

# --- artifacts and images -------------------------------------------------------------------------
CHECKPOINTS_ARTIFACT_DIR = "checkpoints"    # step-*.pt + .sha256, and posthoc-ema/ (tasks.run_files)
CONFIG_ARTIFACT = "config.json"             # the whole PipelineConfig: retrain, evaluate and resume read it
LOSS_CURVE_ARTIFACT = "plots/loss_curve.png"
SCHEDULE_PLOT_ARTIFACT = "plots/noise_schedule.png"
GUIDANCE_SWEEP_TABLE = "evaluation/guidance_sweep.json"
GUIDANCE_SWEEP_PLOT = "plots/guidance_sweep.png"
POSTHOC_TABLE = "evaluation/posthoc_ema.json"
POSTHOC_PLOT = "plots/posthoc_ema.png"
SAMPLES_FOLDER = "samples"                  # sample grids and the settings that drew them
EVALUATION_FOLDER = "evaluation"            # per-class FIDs, class histograms
SAMPLES_IMAGE = "samples"                   # MLflow image key: a grid per sampled checkpoint
PROGRESS_IMAGE = "progress"                 # MLflow image key: a grid per checkpoint during training

# --- the logged and registered model -------------------------------------------------------------
LOGGED_MODEL_NAME = "model"
LOGGED_STEP_TAG = "checkpoint.step"         # a logged model's checkpoint step ...
LOGGED_MAX_IMAGES_TAG = "max_images"        # ... and request bound: promotion reuses a model that matches
# a registered version's tags: its FID and how it was measured (COMPARABILITY_TAGS), where it came from,
# and the promotion decision with its reason
VERSION_FID_TAG = "fid"
SOURCE_RUN_TAG = "source_run_id"
DECISION_TAG, REASON_TAG = "promotion.decision", "promotion.reason"
# the head-to-head behind a decision (tasks.registry.challenge), on the challenger's version and run:
# challenger_fid, champion_fid (means over the seeds) and their _std, difference, margin, seeds, protocol
HEAD_TO_HEAD_PREFIX = "promotion.head_to_head."

# --- serving the champion (tasks.champion_server) ------------------------------------------------
# a registered version's check by the champion server before it takes traffic: "passed" or "failed"
# (a failed version is never served; the alias goes back to the version serving), and why
SERVING_CHECK_TAG, SERVING_REASON_TAG = "serving.check", "serving.reason"
SERVING_CHECK_PASSED, SERVING_CHECK_FAILED = "passed", "failed"
SERVING_CHECKED_AT_TAG = "serving.checked_at"   # when (epoch seconds): replicas agree on a failed version


# --- the protocol: what makes two scores comparable ------------------------------------------

class Protocol:
    """How a run's ranking score was measured, as one value: the metric (measure and features,
    ddpm.metrics.measures), the data (its fingerprint: the reference), the sample count, the kind of
    model and the sampler. Two scores are comparable only when their protocols are equal.

    Built from a run's (or a registered version's) tags and written back with the same tag names
    (COMPARABILITY_TAGS), so every stored run and version reads unchanged. A missing tag is None
    (a run from before it existed), the kind of model "false" (TAG_DEFAULTS). Its measure gives the
    direction every reader ranks by (`rank`, `better`, `best`)."""

    __slots__ = ("metric", "fingerprint", "num_samples", "conditional", "sampler")
    FIELDS = ((FID_METRIC_TAG, "metric", "metric"), (DATASET_FINGERPRINT_TAG, "fingerprint", "dataset"),
              (FID_NUM_SAMPLES_TAG, "num_samples", "sample count"), (CONDITIONAL_TAG, "conditional", "kind of model"),
              (FID_SAMPLER_TAG, "sampler", "sampler"))

    def __init__(self, metric: str | None, fingerprint: str | None = None, num_samples=None,
                 conditional: str | bool | None = None, sampler: str | None = None):
        self.metric = metric
        self.fingerprint = fingerprint
        self.num_samples = None if num_samples is None else str(num_samples)
        if isinstance(conditional, bool):
            conditional = str(conditional).lower()
        self.conditional = conditional if conditional is not None else TAG_DEFAULTS[CONDITIONAL_TAG]
        self.sampler = sampler

    @classmethod
    def from_tags(cls, tags: dict, **overrides) -> "Protocol":
        """The protocol a run's or version's tags record; `overrides` replace fields (a metric asked for)."""
        values = {field: tags.get(tag, TAG_DEFAULTS.get(tag)) for tag, field, _ in cls.FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def of_run(cls, run, **overrides) -> "Protocol":
        return cls.from_tags(run.data.tags, **overrides)

    def tags(self) -> dict[str, str]:
        """The tags that record it (today's names; an unknown sampler is left out, as before)."""
        return {tag: str(getattr(self, field)) for tag, field, _ in self.FIELDS if getattr(self, field) is not None}

    def _values(self) -> tuple:
        return tuple(getattr(self, field) for _, field, _ in self.FIELDS)

    def __eq__(self, other) -> bool:
        return isinstance(other, Protocol) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Protocol(" + ", ".join(f"{field}={getattr(self, field)!r}" for _, field, _ in self.FIELDS) + ")"

    def difference(self, other: "Protocol") -> str | None:
        """The first thing `other` was measured with otherwise, in words ("another sample count
        (fid.num_samples '500' vs '300')"), None when they are comparable."""
        for tag, field, what in self.FIELDS:
            if getattr(self, field) != getattr(other, field):
                return f"another {what} ({tag} {getattr(other, field)!r} vs {getattr(self, field)!r})"
        return None

    def matches(self, tags: dict) -> bool:
        return self.difference(Protocol.from_tags(tags)) is None

    @property
    def measure(self):
        """The metric's measure (ddpm.metrics.measures.Measure): its direction and floor."""
        from ddpm.metrics.measures import measure_of

        return measure_of(self.metric)

    def rank(self, items, value=lambda x: x) -> list:
        """`items` best first by the measure's direction."""
        return self.measure.ranked(items, value)

    def best(self, items, value=lambda x: x):
        return self.measure.best(items, value)

    def better(self, a: float, b: float) -> bool:
        return self.measure.better(a, b)

    def describe(self) -> str:
        what = "class-conditional" if self.conditional == "true" else "unconditional"
        return (f"{self.metric} at {self.num_samples} samples on dataset {self.fingerprint} of {what} models"
                + (f" with sampler {self.sampler}" if self.sampler else ""))

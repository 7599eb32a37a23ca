"""The MLflow registry side of the pipeline: the pyfunc model that serves images, and promotion.

    DDPMImageModel      an MLflow pyfunc: predict({"num_images": n}, params) -> n images
    log_ddpm_model      log a run's EMA weights as that pyfunc and register it as a new version
    promote_best        register the best run by FID and move the `champion` alias when it wins

The pyfunc bundles one file-pair, an EMA-only checkpoint (`step-XXXXXXX.pt` + its `.sha256`,
the format of ddpm.checkpoint) that also holds the model and diffusion configs. The
PythonModel class is pickled *by reference* to `tasks.registry.DDPMImageModel`: the model loads
wherever this project is installed (pip install ddpm-pipeline), from any working directory.
We deliberately pass no `code_paths`: a copy of the code inside the model would shadow the
installed package on sys.path at load time, and a model registered months ago would then run
months-old code next to a newer `ddpm` package. The cost: loading needs the project installed
(`--env-manager local` for `mlflow models serve`).
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from ddpm.checkpoint import (
    CheckpointError, checkpoint_step, ema_weights, list_checkpoints, load_checkpoint, load_model, save_checkpoint,
)
from ddpm.guidance import MAX_GUIDANCE_SCALE
from ddpm.images import to_uint8
from ddpm.samplers import SAMPLERS, SamplerConfig, generate
from tasks import tracking

CHAMPION = "champion"
DEFAULT_MODEL_NAME = "ddpm"
# what a request may ask for when it says nothing; declared in the signature so MLflow passes them
# (steps 0: the sampler's own default, ddpm.samplers.DEFAULT_STEPS; all T steps for ddpm)
# class -1: every class in turn (a class-conditional model); guidance -1: the default scale
DEFAULT_PARAMS = {"seed": 0, "sampler": SamplerConfig().sampler, "steps": 0, "eta": SamplerConfig().eta,
                  "format": "uint8", "class": -1, "guidance": -1.0}
FORMATS = ("uint8", "png_base64")


def invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 (INVALID_PARAMETER_VALUE)."""
    return MlflowException.invalid_parameter_value(message)


def png_base64(image_chw: np.ndarray) -> str:
    """One (C, H, W) uint8 image -> PNG bytes -> base64 text (what HTTP clients decode)."""
    array = image_chw[0] if image_chw.shape[0] == 1 else np.transpose(image_chw, (1, 2, 0))
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# MLflow warns, on every import of this module (so on every command), that `predict` has no type
# hints; its own `catch_warnings` + `simplefilter("once")` defeats warning filters. The model's
# schema is the signature logged with it, on purpose: the warning is dropped while the class is made.
_showwarning, warnings.showwarning = warnings.showwarning, lambda *args, **kwargs: None


class DDPMImageModel(PythonModel):
    """Images from a DDPM: input one row `num_images`; params seed, sampler, steps, eta, format,
    and for a class-conditional model class and guidance.

    Returns a uint8 array (N, C, H, W) for format "uint8", or a list of N base64 PNG strings for
    "png_base64". Requests are bounded: 1 <= num_images <= max_images, 0 <= steps <= min(T,
    max_steps), 0 <= eta <= 1, seed >= 0, class in the model's classes (-1: each in turn),
    0 <= guidance <= 20 (-1: the default scale); anything else, and a class or guidance asked of
    an unconditional model, is an HTTP 400 with the reason.
    """

    def __init__(self, max_images: int = 64, max_steps: int = 1000):
        self.max_images = max_images
        self.max_steps = max_steps

    def load_context(self, context) -> None:
        # the bundled folder holds exactly one checkpoint (see write_ema_checkpoint)
        checkpoints = list_checkpoints(Path(context.artifacts["checkpoint"]))
        if len(checkpoints) != 1:
            raise CheckpointError(f"the model bundle {context.artifacts['checkpoint']} holds "
                                  f"{len(checkpoints)} checkpoints, expected one")
        self.model, self.diffusion_config, state = load_model(checkpoints[0], use_ema=False)
        self.step = int(state["step"])
        self.schedule = self.diffusion_config.make_schedule()

    def _request(self, model_input: Any, params: dict | None) -> tuple[int, dict]:
        """Validate the request: the image count and the sampling params, with a clear message."""
        if isinstance(model_input, dict):
            model_input = pd.DataFrame({k: v if isinstance(v, (list, tuple, np.ndarray)) else [v]
                                        for k, v in model_input.items()})
        if not isinstance(model_input, pd.DataFrame) or "num_images" not in model_input.columns:
            raise invalid("the input must be one record with an integer 'num_images', "
                          'e.g. {"dataframe_records": [{"num_images": 4}]}')
        if len(model_input) != 1:
            raise invalid(f"send exactly one record with 'num_images', got {len(model_input)}")
        num_images = model_input["num_images"].iloc[0]
        params = {**DEFAULT_PARAMS, **(params or {})}
        checks = {"num_images": num_images, "seed": params["seed"], "steps": params["steps"]}
        for name, value in checks.items():
            value = value.item() if isinstance(value, np.generic) else value   # 2.5, not np.float64(2.5)
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid(f"'{name}' must be an integer, got {value!r}")
        if not 1 <= num_images <= self.max_images:
            raise invalid(f"'num_images' must be between 1 and {self.max_images}, got {num_images}")
        max_steps = min(self.diffusion_config.num_timesteps, self.max_steps)
        if not 0 <= params["steps"] <= max_steps:
            raise invalid(f"'steps' must be between 1 and {max_steps} (or 0: the sampler's default), "
                          f"got {params['steps']}")
        if params["seed"] < 0:
            raise invalid(f"'seed' must be >= 0, got {params['seed']}")
        if params["sampler"] not in SAMPLERS:
            raise invalid(f"'sampler' must be one of {list(SAMPLERS)}, got {params['sampler']!r}")
        eta = params["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.number)) or not 0 <= eta <= 1:
            raise invalid(f"'eta' must be a number between 0 and 1, got {eta!r}")
        if params["format"] not in FORMATS:
            raise invalid(f"'format' must be one of {list(FORMATS)}, got {params['format']!r}")
        self._check_conditioning(params["class"], params["guidance"])
        return int(num_images), params

    def _check_conditioning(self, class_label, guidance) -> None:
        num_classes = self.model.config.num_classes
        if isinstance(class_label, (bool, np.bool_)) or not isinstance(class_label, (int, np.integer)):
            raise invalid(f"'class' must be an integer, got {class_label!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or math.isnan(guidance):
            raise invalid(f"'guidance' must be a number, got {guidance!r}")
        if num_classes is None:
            if class_label != -1 or guidance != -1:
                raise invalid(f"'{'class' if class_label != -1 else 'guidance'}' needs a class-conditional model; "
                              "this one is unconditional")
            return
        if not -1 <= class_label < num_classes:
            raise invalid(f"'class' must be one of this model's classes 0..{num_classes - 1} (or -1: each in turn), "
                          f"got {class_label}")
        if guidance != -1 and not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise invalid(f"'guidance' must be between 0 and {MAX_GUIDANCE_SCALE:g} (or -1: the default), "
                          f"got {guidance!r}")

    def predict(self, context, model_input, params: dict | None = None):
        """Draw the images the request asks for (deterministic for a given seed)."""
        num_images, params = self._request(model_input, params)
        conditioning = {}
        if params["class"] != -1:
            conditioning["classes"] = (int(params["class"]),)
        if params["guidance"] != -1:
            conditioning["guidance_scale"] = float(params["guidance"])
        sampling = SamplerConfig(sampler=params["sampler"], num_steps=int(params["steps"]) or None,
                                 eta=float(params["eta"]), num_images=num_images, seed=int(params["seed"]),
                                 batch_size=num_images, **conditioning)
        sampler = sampling.build(self.schedule, self.diffusion_config.prediction_type)
        images = to_uint8(generate(self.model, sampler, num_images, seed=sampling.seed, batch_size=num_images,
                                   class_labels=sampling.class_labels(self.model.config.num_classes),
                                   guidance_scale=sampling.guidance())).numpy()
        if params["format"] == "png_base64":
            return [png_base64(image) for image in images]
        return images


warnings.showwarning = _showwarning


def write_ema_checkpoint(checkpoint: Path | str, out_dir: Path | str) -> Path:
    """A serving-only copy of `checkpoint`: its EMA weights (as "model") and configs, no optimizer.

    About a quarter of the training checkpoint (no raw weights, no Adam moments); written with
    ddpm.checkpoint.save_checkpoint so it carries its sha256 and loads with load_model(use_ema=False).
    """
    state = load_checkpoint(Path(checkpoint))
    slim = {"step": state["step"], "model": ema_weights(state), "model_config": state["model_config"],
            "diffusion_config": state["diffusion_config"], "train_config": state.get("train_config", {}),
            "weights": "ema"}
    return save_checkpoint(slim, Path(out_dir), int(state["step"]))


def model_signature(model_config: dict, max_images: int):
    """Input: a one-row frame {num_images}; output: uint8 (N, C, H, W); params with defaults.

    `num_images` is declared Any, not long: MLflow's scoring server casts JSON to a declared column
    type (2.5 -> 2, true -> 1, "3" -> 3) before `predict` could refuse it; `_request` checks the
    integer itself. Params are checked strictly by MLflow as declared."""
    example_input = pd.DataFrame({"num_images": [min(4, max_images)]})
    example_output = np.zeros((1, model_config["in_channels"], model_config["image_size"],
                               model_config["image_size"]), np.uint8)
    inferred = infer_signature(example_input, example_output, params=DEFAULT_PARAMS)
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "num_images")]), outputs=inferred.outputs,
                          params=inferred.params)


def log_ddpm_model(run_id: str, checkpoint: Path | str, registered_model_name: str | None = None,
                   max_images: int = 64, max_steps: int = 1000):
    """Log `checkpoint`'s EMA weights into MLflow run `run_id` as pyfunc "model"; register it if named.

    Returns MLflow's ModelInfo (`registered_model_version` is set when registered). The run is
    addressed by id, so this works whatever run is active in the calling thread.
    """
    mlflow_client = tracking.client()  # also sets the tracking URI
    state = load_checkpoint(Path(checkpoint))
    # Model.log(run_id=...) alone files the model under the *active* experiment (Default, whose
    # artifacts go to ./mlruns of whatever directory created the store): create it in the run's.
    logged_model = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, experiment_id=mlflow_client.get_run(run_id).info.experiment_id,
        tags={"checkpoint.step": str(int(state["step"])), "max_images": str(max_images)})
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "checkpoint"
        write_ema_checkpoint(checkpoint, bundle)
        info = mlflow.models.Model.log(
            artifact_path=None,  # deprecated in favour of name=, but still a required argument here
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged_model.model_id,
            python_model=DDPMImageModel(max_images=max_images, max_steps=max_steps),
            artifacts={"checkpoint": str(bundle)},
            signature=model_signature(state["model_config"], max_images),
            # shown in the UI with the request it makes; MLflow also checks it by drawing that one
            # image (its default sampler) before the model is logged
            input_example=pd.DataFrame({"num_images": [1]}),
            registered_model_name=registered_model_name,
            # Written out rather than inferred: inference imports the model in a subprocess (slow)
            # and cannot name this project, which is not on PyPI. Serve with --env-manager local.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "numpy", "pandas", "pillow", "pydantic>=2.7,<3"],
        )
    if mlflow_client.get_logged_model(logged_model.model_id).status != LoggedModelStatus.READY:
        mlflow_client.finalize_logged_model(logged_model.model_id, LoggedModelStatus.READY)
    return info


# --- promotion ------------------------------------------------------------------------------


def runs_with_fid(experiments: list[str]) -> list:
    """FINISHED runs of `experiments` that carry an FID (tag `fid.metric` and that metric), newest first."""
    mlflow_client = tracking.client()
    ids = [e.experiment_id for name in experiments if (e := mlflow_client.get_experiment_by_name(name))]
    if not ids:
        return []
    runs = mlflow_client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=5000,
                                     order_by=["attributes.end_time DESC"])
    return [r for r in runs if r.data.tags.get("fid.metric") in r.data.metrics]


def is_conditional(run) -> str:
    """"true" for a class-conditional model's run, else "false" (runs from before the tag included)."""
    return run.data.tags.get(tracking.CONDITIONAL_TAG, "false")


def comparable_runs(experiments: list[str] | str, metric: str | None = None, fingerprint: str | None = None,
                    num_samples: int | str | None = None, conditional: bool | None = None) -> tuple[list, dict]:
    """The FINISHED runs of `experiments` whose FIDs can be ranked against each other, best first,
    and what they share: one metric (features), one dataset fingerprint, one sample count, one
    kind of model (class-conditional or not: guided class-balanced samples and unconditional
    ones are different products). FID depends on all of these, so runs that differ in any are
    never compared. Each defaults to that of the newest run with an FID (with `metric`, when
    given). LookupError when none qualifies.
    """
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    runs = runs_with_fid(experiments)
    if not runs:
        raise LookupError(f"no finished run with an FID in experiment(s) {experiments}; train one first")
    metric = metric or runs[0].data.tags["fid.metric"]
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        raise LookupError(f"no finished run in {experiments} has the metric {metric}")
    fingerprint = fingerprint or runs[0].data.tags.get("dataset.fingerprint")
    num_samples = str(num_samples or runs[0].data.tags.get("fid.num_samples"))
    kind = is_conditional(runs[0]) if conditional is None else str(bool(conditional)).lower()
    criteria = {"metric": metric, "fingerprint": fingerprint, "num_samples": num_samples, "conditional": kind}
    same = [r for r in runs if r.data.tags.get("dataset.fingerprint") == fingerprint
            and r.data.tags.get("fid.num_samples") == num_samples and is_conditional(r) == kind]
    if not same:
        what = "class-conditional" if kind == "true" else "unconditional"
        raise LookupError(f"no finished run of a {what} model in {experiments} has {metric} at {num_samples} "
                          f"samples on dataset {fingerprint}")
    return sorted(same, key=lambda r: r.data.metrics[metric]), criteria


def checkpoint_for_fid(run, metric: str) -> Path | None:
    """The checkpoint whose samples gave the run's `metric` (the step of it), else the newest one;
    found where evaluate finds them (tracking.run_checkpoints)."""
    checkpoints = tracking.run_checkpoints(run)
    if not checkpoints:
        return None
    history = tracking.client().get_metric_history(run.info.run_id, metric)
    step = max(history, key=lambda m: m.timestamp).step if history else None
    by_step = {checkpoint_step(p): p for p in checkpoints}
    return by_step.get(step, checkpoints[-1])


def register_logged_model(run, checkpoint: Path, model_name: str, max_images: int):
    """Register the model the training run logged of `checkpoint` (same step, same request bound)
    instead of logging it again; None when the run has no such model."""
    mlflow_client = tracking.client()
    step = str(checkpoint_step(checkpoint))
    models = mlflow_client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`checkpoint.step` = '{step}' "
                      f"AND tags.`max_images` = '{max_images}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        return None
    return mlflow.register_model(f"models:/{ready[0].model_id}", model_name)


def registered_version(model_name: str, run_id: str):
    """The version of `model_name` already registered from run `run_id`, or None."""
    versions = tracking.client().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def current_champion(model_name: str):
    try:
        return tracking.client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:  # no registered model, or no alias yet
        return None


def champion_decision(candidate_tags: dict, champion_tags: dict | None) -> tuple[bool, str]:
    """Whether the candidate version should take the `champion` alias, and why (or why not).

    Only FIDs measured on the same data (dataset fingerprint) with the same features (metric
    name) and the same number of samples are comparable. A champion measured otherwise is kept: replacing it would compare
    numbers that mean different things; move the alias by hand if the new data is the point. A
    class-conditional model never replaces an unconditional champion, nor the reverse (tag
    model.conditional): promote each kind into its own registered model.
    """
    if champion_tags is None:
        return True, "no champion yet"
    for key, what in (("fid.metric", "FID extractor"), ("dataset.fingerprint", "dataset"),
                      ("fid.num_samples", "sample count"), (tracking.CONDITIONAL_TAG, "kind of model")):
        if champion_tags.get(key, "false" if key == tracking.CONDITIONAL_TAG else None) != candidate_tags[key]:
            return False, (f"champion was measured with another {what} ({key} {champion_tags.get(key)!r} "
                           f"vs {candidate_tags[key]!r}); FIDs are not comparable, champion kept")
    new, old = float(candidate_tags["fid"]), float(champion_tags["fid"])
    if math.isnan(old) or new < old:
        return True, f"{candidate_tags['fid.metric']} {new:.4g} beats the champion's {old:.4g}"
    word = "ties" if new == old else "is worse than"
    return False, f"{candidate_tags['fid.metric']} {new:.4g} {word} the champion's {old:.4g}; champion kept"


def champion_tags(champion) -> dict:
    """The champion version's tags; a version registered before `fid.num_samples` was tagged
    takes it from its source run."""
    tags = dict(champion.tags)
    if "fid.num_samples" not in tags and tags.get("source_run_id"):
        try:
            run = tracking.client().get_run(tags["source_run_id"])
            tags["fid.num_samples"] = run.data.tags.get("fid.num_samples")
        except MlflowException:  # the source run was deleted: not comparable
            pass
    return tags


def promote_best(experiments: list[str] | str = "ddpm", model_name: str = DEFAULT_MODEL_NAME,
                 fingerprint: str | None = None, metric: str | None = None, max_images: int = 64,
                 log=print, conditional: bool | None = None) -> dict:
    """Register the best run by FID as a version of `model_name`; move `champion` to it if it wins.

    Candidates: comparable_runs(experiments, metric, fingerprint, conditional=conditional):
    FINISHED runs with `metric` on data `fingerprint` at one sample count, of one kind of model
    (class-conditional or not), each by default that of the newest run with an FID. The best candidate is registered once (a run already registered reuses its version),
    its version tagged with fid, fid.metric, fid.num_samples, schedule, dataset.fingerprint and
    source_run_id, and the alias moves only when its FID is strictly lower than the champion's
    on the same data, metric and sample count. The decision and its reason go in the version's
    tags `promotion.decision`/`promotion.reason`.
    """
    # One promotion at a time per store on this machine: two at once registered one run twice.
    with tracking.store_lock("promote"):
        return _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional)


def _promote_best(experiments, model_name, fingerprint, metric, max_images, log, conditional) -> dict:
    candidates, criteria = comparable_runs(experiments, metric, fingerprint, conditional=conditional)
    metric, fingerprint = criteria["metric"], criteria["fingerprint"]

    def fid_of(run) -> float:
        return float(run.data.metrics[metric])

    mlflow_client = tracking.client()
    skipped = []
    for run in candidates:  # the best one we can still register
        version = registered_version(model_name, run.info.run_id)
        if version is not None:
            break
        checkpoint = checkpoint_for_fid(run, metric)
        if checkpoint is None:
            skipped.append(run.info.run_id)
            log(f"run {run.info.run_id} ({metric} {fid_of(run):.4g}) has no checkpoint under "
                f"{', '.join(map(str, tracking.checkpoint_folders(run)))}; trying the next best")
            continue
        version = register_logged_model(run, checkpoint, model_name, max_images)
        if version is None:
            info = log_ddpm_model(run.info.run_id, checkpoint, model_name, max_images=max_images)
            version = mlflow_client.get_model_version(model_name, str(info.registered_model_version))
        break
    else:
        raise LookupError(f"none of the {len(candidates)} candidate runs has its checkpoint on this machine")

    tags = {"fid": repr(fid_of(run)), "fid.metric": metric, "fid.num_samples": criteria["num_samples"],
            "dataset.fingerprint": fingerprint, "schedule": run.data.tags.get("schedule", ""),
            "source_run_id": run.info.run_id, tracking.CONDITIONAL_TAG: criteria["conditional"]}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version.version, key, value)

    champion = current_champion(model_name)
    if champion is not None and champion.version == version.version:
        moved, reason = False, "already the champion"
    else:
        moved, reason = champion_decision(tags, champion_tags(champion) if champion else None)
    if moved:
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, version.version)
    if not (champion is not None and champion.version == version.version):   # a repeat keeps its first reason
        mlflow_client.set_model_version_tag(model_name, version.version, "promotion.decision",
                                            CHAMPION if moved else "kept")
        mlflow_client.set_model_version_tag(model_name, version.version, "promotion.reason", reason)
    champion_version = version.version if moved else (champion.version if champion else None)
    log(f"{model_name} version {version.version} (run {run.info.run_id}, {metric} {fid_of(run):.4g}): "
        f"{'now' if moved else 'not'} {CHAMPION}: {reason}")
    return {"model_name": model_name, "version": str(version.version), "run_id": run.info.run_id,
            "fid": fid_of(run), "metric": metric, "num_samples": criteria["num_samples"],
            "fingerprint": fingerprint, "conditional": criteria["conditional"] == "true", "moved": moved,
            "reason": reason, "champion_version": str(champion_version) if champion_version else None,
            "skipped_runs": skipped}

"""The served model: an MLflow pyfunc that draws images from a run's EMA weights.

    log_ddpm_model      log a run's EMA weights as that pyfunc (a LoggedModel), registered if named
    model_signature     its input, output and params
    write_ema_checkpoint  the EMA-only checkpoint the pyfunc bundles
    DDPMImageModel      the pyfunc itself (defined in tasks/served_model.py, re-exported here)

Promotion (which run's model becomes the champion) is tasks.registry.

The pyfunc bundles one file-pair, an EMA-only checkpoint (`step-XXXXXXX.pt` + its `.sha256`,
the format of ddpm.checkpoint) that also holds the model and diffusion configs, and is logged
with MLflow's *models-from-code*: `python_model` is the path of tasks/served_model.py, a
self-contained file that defines DDPMImageModel, imports only `ddpm.*`, mlflow, numpy, pandas and
PIL, and ends with `mlflow.models.set_model(...)`. MLflow copies that file into the model and runs
it at load time; the request bounds (`max_images`, `max_steps`) travel as the model's
`model_config`. Nothing is pickled, so the model does not name this project's generic top-level
`tasks` package: it loads wherever `ddpm` is importable (pip install ddpm-pipeline), from any
working directory, even in a process where another package called `tasks` wins the import.
MLflow also logs the model config as the run's params `max_images` and `max_steps`: a second
model of one run with other bounds keeps the first values there (MLflow warns "Failed to log
model config as params"); the model's own bounds are in its MLmodel and its `max_images` tag.

We deliberately pass no `code_paths`: a copy of the `ddpm` package inside the model would shadow
the installed one on sys.path at load time, and a model registered months ago would then run
months-old code next to a newer `ddpm`. Only the small served_model.py travels with the model,
so the `ddpm` names it uses are an API old models call. The cost: loading needs the project
installed (`--env-manager local` for `mlflow models serve`).

Versions logged before the switch hold a cloudpickled DDPMImageModel instance, by reference to
`tasks.serving.DDPMImageModel` (the oldest: `tasks.registry.DDPMImageModel`): both modules
re-export the class, so those versions still unpickle (with the project's `tasks` importable).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from ddpm.checkpoint import ema_weights, load_checkpoint, save_checkpoint
from tasks import contract, served_model, tracking
# Versions logged before models-from-code pickled a reference to tasks.serving.DDPMImageModel.
from tasks.served_model import (  # noqa: F401
    DEFAULT_MAX_IMAGES, DEFAULT_MAX_SECONDS, DEFAULT_MAX_STEPS, DEFAULT_PARAMS, FORMATS, DDPMImageModel, invalid,
    png_base64,
)

# the file MLflow logs as the model's code (models-from-code)
MODEL_CODE = Path(served_model.__file__)


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
    type (2.5 -> 2, true -> 1, "3" -> 3) before `predict` could refuse it; DDPMImageModel checks the
    integer itself. Params are checked strictly by MLflow as declared."""
    example_input = pd.DataFrame({"num_images": [min(4, max_images)]})
    example_output = np.zeros((1, model_config["in_channels"], model_config["image_size"],
                               model_config["image_size"]), np.uint8)
    inferred = infer_signature(example_input, example_output, params=DEFAULT_PARAMS)
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "num_images")]), outputs=inferred.outputs,
                          params=inferred.params)


def log_ddpm_model(run_id: str, checkpoint: Path | str, registered_model_name: str | None = None,
                   max_images: int = DEFAULT_MAX_IMAGES, max_steps: int = DEFAULT_MAX_STEPS,
                   max_seconds: float = DEFAULT_MAX_SECONDS, tags: dict | None = None):
    """Log `checkpoint`'s EMA weights into MLflow run `run_id` as pyfunc "model"; register it if named.
    `tags` go on the logged model beside its step and request bound.

    The model is served_model.py logged as code, `max_images`/`max_steps`/`max_seconds` its model config.
    Returns MLflow's ModelInfo (`registered_model_version` is set when registered). The run is
    addressed by id, so this works whatever run is active in the calling thread.
    """
    mlflow_client = tracking.client()  # also sets the tracking URI
    state = load_checkpoint(Path(checkpoint))
    # Model.log(run_id=...) alone files the model under the *active* experiment (Default, whose
    # artifacts go to ./mlruns of whatever directory created the store): create it in the run's.
    logged_model = mlflow.initialize_logged_model(
        name=contract.LOGGED_MODEL_NAME, source_run_id=run_id,
        experiment_id=mlflow_client.get_run(run_id).info.experiment_id,
        tags={contract.LOGGED_STEP_TAG: str(int(state["step"])), contract.LOGGED_MAX_IMAGES_TAG: str(max_images),
              **(tags or {})})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow hints that an integer column cannot hold missing values, at every logging: this
        # input is declared Any (model_signature) and checked by the model itself
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        bundle = Path(tmp) / "checkpoint"
        write_ema_checkpoint(checkpoint, bundle)
        info = mlflow.models.Model.log(
            artifact_path=None,  # deprecated in favour of name=, but still a required argument here
            name=contract.LOGGED_MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged_model.model_id,
            # models-from-code: the file, copied into the model and run at load time (no pickle)
            python_model=str(MODEL_CODE),
            # every key a loader may override (load_model(uri, model_config=...)) must be here
            model_config={contract.MAX_IMAGES_PARAM: int(max_images), contract.MAX_STEPS_PARAM: int(max_steps),
                          contract.MAX_SECONDS_PARAM: float(max_seconds)},
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

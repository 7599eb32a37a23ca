"""The served model: an MLflow pyfunc that draws images from a run's EMA weights.

    DDPMImageModel      an MLflow pyfunc: predict({"num_images": n}, params) -> n images
    log_ddpm_model      log a run's EMA weights as that pyfunc (a LoggedModel), registered if named

Promotion (which run's model becomes the champion) is tasks.registry.

The pyfunc bundles one file-pair, an EMA-only checkpoint (`step-XXXXXXX.pt` + its `.sha256`,
the format of ddpm.checkpoint) that also holds the model and diffusion configs. The
PythonModel class is pickled *by reference* to `tasks.serving.DDPMImageModel` (models registered
before this module existed name `tasks.registry.DDPMImageModel`, which tasks.registry re-exports
for them): the model loads
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
    CheckpointError, ema_weights, list_checkpoints, load_checkpoint, load_model, save_checkpoint,
)
from ddpm.guidance import MAX_GUIDANCE_SCALE
from ddpm.images import to_uint8
from ddpm.samplers import SAMPLERS, SamplerConfig, generate
from tasks import tracking

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
